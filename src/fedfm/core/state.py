"""Small functions over ``State`` and over the frozen base model."""

from __future__ import annotations

import hashlib

import torch

from fedfm.core.types import State


def state_num_params(state: State) -> int:
    return sum(t.numel() for t in state.values())


def clone_state(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def fingerprint(model: torch.nn.Module, trainable: set[str] | None = None, sample: int = 64) -> str:
    """Hash of the frozen base model: names, shapes, dtypes and a strided sample of values.

    Clients compare it with the server's before training, so that a client holding a
    different base model is caught instead of silently averaging incompatible deltas.
    """
    h = hashlib.sha256()
    trainable = trainable or set()
    for name, p in model.named_parameters():
        if name in trainable or p.requires_grad:
            continue
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(str(p.dtype).encode())
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(flat[::step][:sample].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
