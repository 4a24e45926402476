"""Get and set the trainable State of a model without touching frozen weights.

The State is exactly the parameters with ``requires_grad``: what a tuner made trainable.
Every tuner (LoRA, adapters, BitFit, full) shares these two functions, so the runtime,
codecs and aggregators never need to know which tuner is in use.
"""

from __future__ import annotations

import torch

from fedfm.core.types import State


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_state(model: torch.nn.Module) -> State:
    """A detached copy of every trainable parameter (float32 on CPU)."""
    return {
        n: p.detach().to("cpu", torch.float32, copy=True)
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def set_state(model: torch.nn.Module, state: State) -> None:
    """Copy ``state`` into the trainable parameters; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"state does not match the trainable parameters: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for name, p in params.items():
            t = state[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"state['{name}'] has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(p.device, p.dtype))


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
