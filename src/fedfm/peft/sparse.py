"""Sparse fine-tuning with a random mask fixed for the whole run: in each targeted linear
layer, ``ceil(density * numel)`` entries drawn at random from a shared seed are trained,
the rest of the model is frozen; every client trains the same entries.

This is the first stage of SLoRA (Babakniya et al. 2023, "SLoRA: Federated Parameter
Efficient Fine-Tuning of Language Models"): sparse fine-tuning with a random mask, about
1% density, whose accumulated update then initialises LoRA by its SVD (the second stage:
``peft: {method: lora, init: svd}`` in a stage chained after this one, ``peft/svd_init.py``;
``examples/peft/slora.yaml``). On its own it is a selective FedPEFT method whose State and
bytes scale with ``density``.

The mask is a pure function of ``mask_seed`` and each layer's position among the targeted
layers (model order): ``torch.randperm`` of the entries from a generator seeded by
``derive_seed(mask_seed, SPARSE_TAG, position)``, first ``k`` kept, sorted. No index ever
travels, and a later run (``model.init_from``) recomputes it from the finished run's
config. Written by hand: ``peft`` has no random-mask sparse fine-tuning. The trainable
tensor of each layer is the selected entries (``salience.SelectedEntries``).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.seeding import derive_seed
from fedfm.peft.base import register_tuner
from fedfm.peft.freezing import find_modules
from fedfm.peft.salience import train_selected

SPARSE_TAG = 0x5B4E5


class SparseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    density: float = Field(0.01, gt=0, le=1, description="share of each targeted weight's entries that is trained")
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    mask_seed: int = Field(0, ge=0, description="seed of the random mask (the same for every client)")
    train_head: bool = True


def random_entries(numel: int, density: float, mask_seed: int, position: int) -> torch.Tensor:
    """Sorted indices of ``ceil(density * numel)`` distinct entries out of ``numel``."""
    k = max(1, math.ceil(density * numel))
    g = torch.Generator().manual_seed(derive_seed(mask_seed, SPARSE_TAG, position))
    return torch.sort(torch.randperm(numel, generator=g)[:k]).values  # (k,)


def selections(model: torch.nn.Module, params: SparseParams) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """(module name, module, selected flat indices) of every targeted layer."""
    found = find_modules(model, list(params.target_modules))
    return [
        (name, module, random_entries(module.weight.numel(), params.density, params.mask_seed, i))
        for i, (name, module) in enumerate(found)
    ]


def sparse(model: torch.nn.Module, params: SparseParams, task: str) -> torch.nn.Module:
    return train_selected(model, selections(model, params), "element", params.train_head)


register_tuner("sparse", sparse, SparseParams)
