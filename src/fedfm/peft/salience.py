"""Salience-selected parameter subsets: rank the weights of the targeted linear layers by
their l1 or l2 magnitude and train only the top fraction, one subset that every client
trains.

Inspired by RaFFM (Yu et al. 2023, "Bridging the Gap Between Foundation Models and
Heterogeneous Federated Learning"), but not RaFFM: RaFFM uses salience to extract, for
each client, a sub-model sized to that client's resources, and aggregates those
heterogeneous sub-models. Here there is one selection, the same for every client and
every round, of weights trained inside the full (frozen) model; clients do not differ in
what they hold or train.

Written by hand because ``peft`` has no magnitude-selected sparse fine-tuning. The
selection is a pure function of the frozen pretrained weights, which every client
holds identically (the base fingerprint checks it), so every client trains the same
subset without any index ever travelling. Selection is per tensor:

- ``granularity: row``: whole output rows (neurons) ranked by the l1 or l2 norm of the
  row; the top ``ceil(fraction * rows)`` rows are trained.
- ``granularity: element``: single entries ranked by ``|w|`` (l1 and l2 rank scalars
  identically); the top ``ceil(fraction * numel)`` entries are trained.

Ties are broken by the lower index (stable sort), so the choice is deterministic. Each
selected weight becomes ``W = W_frozen`` with the selected entries replaced by a
trainable tensor of exactly those entries (``torch.nn.utils.parametrize``), so the
State and the bytes on the wire scale with ``fraction``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn.utils import parametrize

from fedfm.peft.base import register_tuner
from fedfm.peft.freezing import find_modules, freeze_all, train_heads


class SalienceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(0.05, gt=0, le=1, description="share of each tensor that is trained")
    norm: Literal["l1", "l2"] = "l1"
    granularity: Literal["row", "element"] = "row"
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "key", "value", "dense"], min_length=1
    )
    train_head: bool = True


def salience_scores(weight: torch.Tensor, norm: str, granularity: str) -> torch.Tensor:
    """Score per row (``(out,)``) or per element (flattened ``(out*in,)``)."""
    w = weight.detach().float()
    if granularity == "element":
        return w.abs().reshape(-1)  # (out*in,)
    p = 1 if norm == "l1" else 2
    return torch.linalg.vector_norm(w, ord=p, dim=1)  # (out,)


def select_top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted indices of the ``ceil(fraction * n)`` largest scores; ties -> lower index."""
    k = max(1, math.ceil(fraction * scores.numel()))
    order = torch.sort(scores, descending=True, stable=True).indices  # (n,)
    return torch.sort(order[:k]).values  # (k,)


class SelectedEntries(torch.nn.Module):
    """Parametrization: the frozen weight with the selected rows/entries replaced by
    ``self.values``, the only trainable tensor (initialised to the pretrained values)."""

    def __init__(self, weight: torch.Tensor, index: torch.Tensor, granularity: str):
        super().__init__()
        self.granularity = granularity
        self.register_buffer("index", index, persistent=False)
        w = weight.detach()
        picked = w[index] if granularity == "row" else w.reshape(-1)[index]  # (k, in) | (k,)
        self.values = torch.nn.Parameter(picked.clone())

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if self.granularity == "row":
            return base.index_copy(0, self.index, self.values.to(base.dtype))  # (out, in)
        flat = base.reshape(-1).index_copy(0, self.index, self.values.to(base.dtype))  # (out*in,)
        return flat.view_as(base)


def selections(model: torch.nn.Module, params: SalienceParams) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """(module name, module, selected indices) of every targeted layer, from its pretrained
    weight; also what ``peft/merge_selected.py`` recomputes to load a finished run."""
    return [
        (name, module, select_top(salience_scores(module.weight, params.norm, params.granularity), params.fraction))
        for name, module in find_modules(model, list(params.target_modules))
    ]


def train_selected(model: torch.nn.Module, chosen, granularity: str, train_head: bool) -> torch.nn.Module:
    """Freeze ``model`` and make the chosen entries of each weight its only trainable part
    (plus the task heads when ``train_head``)."""
    freeze_all(model)
    for _, module, index in chosen:
        parametrize.register_parametrization(module, "weight", SelectedEntries(module.weight, index, granularity))
        module.parametrizations.weight.original.requires_grad_(False)
    if train_head:
        train_heads(model)
    return model


def salience(model: torch.nn.Module, params: SalienceParams, task: str) -> torch.nn.Module:
    return train_selected(model, selections(model, params), params.granularity, params.train_head)


register_tuner("salience", salience, SalienceParams)
