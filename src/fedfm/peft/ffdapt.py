"""FFDAPT: federated domain-adaptive pre-training with a block of consecutive layers frozen
(Jiang et al. 2023, "FDAPT: Federated Domain-adaptive Pre-training for Language Models";
survey section 4.2: "a computational-efficient further pre-training algorithm that freezes
a portion of consecutive layers while optimizing the rest of the layers").

``peft: {method: ffdapt, freeze_start: 0, freeze_count: 3}`` trains every parameter of the
model (full further pre-training) except the transformer layers ``freeze_start ..
freeze_start + freeze_count - 1`` (and, with ``freeze_embeddings``, the embeddings). Frozen
parameters are not in the trainable State: they receive no gradient, no optimizer step,
and never travel. When the frozen block starts at layer 0 and ``freeze_embeddings`` is
true, nothing below the lowest trained layer needs a gradient, so the backward pass stops
there (the compute saving); with the embeddings trainable (``freeze_embeddings: false``,
the default) it runs down through the whole frozen block to reach them, skipping only the
frozen layers' weight gradients. Layers are found by their index in the module names
(``.layer.<i>.`` for BERT-like encoders, ``.layers.<i>.`` for decoders).

The frozen block is fixed for the whole run; progressive layer training (FedBFPT-inspired)
is the ``fedbfpt`` learner (``personalize/fedbfpt.py``).
"""

from __future__ import annotations

import re

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.peft.base import register_tuner

LAYER = re.compile(r"\.layers?\.(\d+)\.")


class FFDAPTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    freeze_start: int = Field(0, ge=0, description="index of the first frozen transformer layer")
    freeze_count: int = Field(1, ge=1, description="number of consecutive frozen layers")
    freeze_embeddings: bool = Field(False, description="also freeze the embedding layer")


def layer_index(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def frozen_names(model: torch.nn.Module, params: FFDAPTParams) -> list[str]:
    indices = {i for n, _ in model.named_parameters() if (i := layer_index(n)) is not None}
    if not indices:
        raise ValueError("peft.freeze_start: the model has no parameters named '.layer.<i>.' or '.layers.<i>.'")
    last = params.freeze_start + params.freeze_count - 1
    if last > max(indices):
        raise ValueError(
            f"peft.freeze_start + freeze_count: layers {params.freeze_start}..{last} exceed the model's "
            f"{max(indices) + 1} layers (0..{max(indices)})"
        )
    out = []
    for n, _ in model.named_parameters():
        i = layer_index(n)
        in_block = i is not None and params.freeze_start <= i <= last
        if in_block or (params.freeze_embeddings and ".embeddings." in f".{n}"):
            out.append(n)
    return out


def ffdapt(model: torch.nn.Module, params: FFDAPTParams, task: str) -> torch.nn.Module:
    frozen = set(frozen_names(model, params))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    return model


register_tuner("ffdapt", ffdapt, FFDAPTParams)
