"""The Task contract (WHAT IS LEARNED) and its registry.

A task builds the model and tokenizer, turns rows of text into token examples, collates
them into batches with dynamic padding, computes the loss, and evaluates. Runtimes and
learners only see this protocol, so text classification and causal LM share everything else.
"""

from __future__ import annotations

from typing import Any, Protocol

import pandas as pd
import torch

from fedfm.core.registry import Registry

# Number of base models built in this process; the local runtime builds exactly one.
BUILD_COUNT = {"models": 0}


class Task(Protocol):
    def build(self, model_cfg: Any, seed: int) -> tuple[torch.nn.Module, Any]:
        """(model, tokenizer) from the config; the only place a model is constructed."""

    def encode(self, frame: pd.DataFrame, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        """One dict of token ids (unpadded) per row of ``frame``."""

    def collate(self, examples: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """A padded batch."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of a batch."""

    def evaluate(self, model: torch.nn.Module, batches) -> dict[str, float]:
        """Metrics over an iterable of batches (``loss`` always among them)."""


tasks: Registry[type] = Registry("model.task")


def register_task(name: str, cls: type, params=None) -> type:
    if params is None:
        return tasks.register(name, cls)
    return tasks.register(name, cls, params)


def build_task(name: str) -> Task:
    return tasks.get(name).obj()


def count_build() -> None:
    BUILD_COUNT["models"] += 1
