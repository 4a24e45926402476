"""HOW A CLIENT LEARNS: the learner contract and registry.

A learner receives the global State in an ``Instruction`` and a ``LocalContext`` (the one
shared base model, the task, the client's encoded examples) and returns an ``Update``
whose payload is the delta ``trained - global`` over the trainable State.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from pydantic import BaseModel

from fedfm.core.registry import NoParams, Registry
from fedfm.core.types import Instruction, Update

if TYPE_CHECKING:
    from fedfm.config import TrainConfig


@dataclass
class LocalContext:
    cid: int
    model: torch.nn.Module
    task: Any
    tokenizer: Any
    examples: list[dict[str, Any]]
    train: TrainConfig
    seed: int
    store: Any = None  # per-client disk-backed state (runtime.store), when a learner needs it
    on_step: Callable[[int, int], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)  # the client's role and capacity (runtime/roles.py)
    round: int = 0


class Learner(Protocol):
    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update: ...


LearnerFactory = Callable[[BaseModel], Learner]
learners: Registry[LearnerFactory] = Registry("learner.name")


def register_learner(name: str, factory: LearnerFactory, params: type[BaseModel] = NoParams) -> LearnerFactory:
    return learners.register(name, factory, params)


def build_learner(spec) -> Learner:
    params = learners.parse(spec.name, spec.params(), "learner")
    return learners.get(spec.name).obj(params)
