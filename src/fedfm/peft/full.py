"""Full fine-tuning: every parameter trained and shared; the 100% baseline."""

from __future__ import annotations

import torch

from fedfm.peft.base import register_tuner


def full(model: torch.nn.Module, params, task: str) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


register_tuner("full", full)
