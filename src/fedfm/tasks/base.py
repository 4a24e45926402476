"""The Task contract (WHAT IS LEARNED) and its registry.

A task builds the model and tokenizer, turns rows of text into token examples, collates
them into batches with dynamic padding, computes the loss, and evaluates. Runtimes and
learners only see this protocol, so text classification and causal LM share everything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import pandas as pd
import torch

from fedfm.core.registry import Registry

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

    # Two hooks, None where a task has none: bind_initial(model, initial State), called once
    # the tuner is applied (the positions a soft prompt takes; DPO's reference model), and
    # finish(model, tokenizer, run directory, held-out rows) -> Path, at the end of a run
    # (a causal LM's sample generations).
    bind_initial: Callable[[torch.nn.Module, dict], None] | None
    finish: Callable[[torch.nn.Module, Any, Path, pd.DataFrame], Path] | None


TASK_MEMBERS = ("build", "encode", "collate", "loss", "evaluate", "bind_initial", "finish")


tasks: Registry[type] = Registry("model.task")


def register_task(name: str, cls: type, params=None) -> type:
    if params is None:
        return tasks.register(name, cls)
    return tasks.register(name, cls, params)


def build_task(name: str) -> Task:
    """The task registered as ``name``, once it declares every ``Task`` member (None for a hook)."""
    task = tasks.get(name).obj()
    missing = [m for m in TASK_MEMBERS if not hasattr(task, m)]
    if missing:
        raise TypeError(f"model.task '{name}' ({type(task).__name__}) lacks {missing}: declare them (None for an unused hook)")
    return task
