"""The data that moves between rooms.

``State`` is what is trained (name -> tensor); the frozen base model never travels.
``ServerState`` is everything the server keeps between rounds, as named groups of
tensors: ``"model"`` (the global shared State) plus any others an algorithm or a server
step declares (optimizer moments ``opt.m``, SCAFFOLD's ``scaffold.c``, ...); all of it is
checkpointed, and nothing server-side lives outside it.

``Instruction`` is what the server sends one sampled client for one round: its State,
the tensor groups broadcast beside it (``broadcast``, e.g. SCAFFOLD's ``c``; they travel
through the downlink codec chain and are counted) and plain settings (``config``).
``Update`` is what a client returns: a payload whose names, shapes and dtypes the server
declared for that client (``Algorithm.payload_spec``), its weight and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

State = dict[str, torch.Tensor]
ServerState = dict[str, State]
MODEL = "model"  # the server-state group holding the global shared State


@dataclass
class ClientSpec:
    """One data owner: its id, the indices of its examples, and its profile.

    ``profile`` is filled from the config's ``federation.roles`` (``role`` and any keys the
    role declares: capacity, rank, cluster, ...); ``eval_indices`` is the client's own
    held-out slice (``federation.client_holdout``), empty by default.
    """

    cid: int
    indices: list[int]
    profile: dict[str, Any] = field(default_factory=dict)
    eval_indices: list[int] = field(default_factory=list)

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
    broadcast: dict[str, State] = field(default_factory=dict)


@dataclass
class Update:
    """What a client returns: a payload (deltas by default), its weight and metrics."""

    cid: int
    payload: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)


def flatten_groups(groups: ServerState) -> dict[str, torch.Tensor]:
    """{"opt.m": {"w": t}} -> {"opt.m/w": t} (cloned, contiguous): one safetensors file."""
    out = {}
    for group, tensors in groups.items():
        if "/" in group:
            raise ValueError(f"server-state group name '{group}' must not contain '/'")
        for name, t in tensors.items():
            out[f"{group}/{name}"] = t.detach().clone().contiguous()
    return out


def unflatten_groups(tensors: dict[str, torch.Tensor]) -> ServerState:
    """The inverse of ``flatten_groups``."""
    groups: ServerState = {}
    for key, t in tensors.items():
        if "/" not in key:
            raise KeyError(f"server-state key '{key}' has no '<group>/' prefix")
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = t
    return groups
