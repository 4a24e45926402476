"""LoRA through the ``peft`` library (Hu et al. 2022, "LoRA: Low-Rank Adaptation of
Large Language Models"); the classification head stays trainable and is shared.
``init: svd`` starts the factors from an earlier run's update (SLoRA, ``peft/svd_init.py``).
"""

from __future__ import annotations

import torch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedfm.peft.base import head_modules, register_tuner


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


def check_targets(model: torch.nn.Module, targets: list[str], key: str = "peft.target_modules") -> None:
    leaves = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise ValueError(f"{key}: {missing} match no module of the model")


def lora(model: torch.nn.Module, params: LoraParams, task: str) -> torch.nn.Module:
    from peft import get_peft_model

    check_targets(model, params.target_modules)
    return get_peft_model(model, lora_config(params, model))


register_tuner("lora", lora, LoraParams)
