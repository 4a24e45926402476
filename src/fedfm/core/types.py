"""The data that moves between rooms.

``State`` is what is trained and shared (name -> tensor); the frozen base model never
travels. ``Update`` is what a client returns. ``Instruction`` is what the server sends
to one sampled client for one round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

State = dict[str, torch.Tensor]


@dataclass
class ClientSpec:
    """One data owner: its id, the indices of its examples, and its profile."""

    cid: int
    indices: list[int]
    profile: dict[str, Any] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return len(self.indices)


@dataclass
class Instruction:
    """What the server asks of one client in one round."""

    round: int
    cid: int
    state: State
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Update:
    """What a client returns: a payload (deltas by default), its weight and metrics."""

    cid: int
    payload: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
