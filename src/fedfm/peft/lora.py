"""LoRA through the ``peft`` library (Hu et al. 2022, "LoRA: Low-Rank Adaptation of
Large Language Models"); the classification head stays trainable and is shared.
``init: svd`` starts the factors from an earlier run's update (SLoRA, ``peft/svd_init.py``).
"""

from __future__ import annotations

import torch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedfm.peft.base import head_modules, register_tuner
from fedfm.peft.freezing import is_head, matches


class LoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float = Field(16.0, gt=0, allow_inf_nan=False, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    train_head: bool = True
    init: Literal["default", "svd"] = Field(
        "default",
        description="svd: B, A from the truncated SVD of model.init_from's update, base weights back to "
        "the pretrained ones (SLoRA's second stage, peft/svd_init.py)",
    )


def lora_config(params: LoraParams, model: torch.nn.Module):
    from peft import LoraConfig

    return LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=list(params.target_modules),
        modules_to_save=head_modules(model) if params.train_head else None,
        bias="none",
    )


# module types peft's LoRA can wrap (peft/tuners/lora/model.py); a target naming anything
# else (a LayerNorm, a dropout, a whole attention block) fails deep inside peft
SUPPORTED = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def supported(module: torch.nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D is a linear layer with a transposed weight
    return isinstance(module, SUPPORTED) or type(module).__name__ == "Conv1D"


def check_targets(model: torch.nn.Module, params: LoraParams, key: str = "peft.target_modules") -> None:
    """Each target names modules the way peft matches them (the full name or a dotted
    suffix: ``query``, ``attention.self.query``), every module it names is one LoRA can wrap,
    a task head trained whole (``train_head``) is not a target, and ``r`` is at most the
    rank ``min(out, in)`` of every targeted weight."""
    heads = head_modules(model) if params.train_head else []
    modules = list(model.named_modules())
    missing = [t for t in params.target_modules if not any(matches(n, t) for n, _ in modules)]
    if missing:
        raise ValueError(f"{key}: {missing} match no module of the model")
    for target in params.target_modules:
        named = [(n, m) for n, m in modules if matches(n, target)]
        if all(is_head(n, heads) for n, _ in named):
            raise ValueError(f"{key}: '{target}' names the task head, which peft.train_head trains whole; "
                             "drop it, or set train_head: false to put LoRA on the head")
        for n, m in named:
            if is_head(n, heads):
                continue
            if not supported(m):
                raise ValueError(f"{key}: '{target}' matches '{n}', a {type(m).__name__}; LoRA wraps linear, "
                                 "embedding and convolution layers only (e.g. query, value, dense)")
            weight = getattr(m, "weight", None)
            rank = min(weight.shape) if weight is not None and weight.dim() == 2 else None  # linear, embedding
            if rank is not None and params.r > rank:
                raise ValueError(f"peft.r: {params.r} exceeds the rank min(out, in) = {rank} of the weight of '{n}' "
                                 f"({key} '{target}'): B A cannot have a higher rank, the extra factors only add bytes; "
                                 f"use r <= {rank}")


def lora(model: torch.nn.Module, params: LoraParams, task: str) -> torch.nn.Module:
    from peft import get_peft_model

    check_targets(model, params)
    return get_peft_model(model, lora_config(params, model))


register_tuner("lora", lora, LoraParams)
