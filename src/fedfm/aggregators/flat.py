"""Client deltas as rows of one matrix, and back: the common ground of the distance-based
rules (Krum, Bulyan, geometric median, ClippedClustering).

A delta State becomes one float64 row: every floating tensor of the server State, in the
State's order, flattened and concatenated. ``view(state, deltas, space)`` gives the rows a
rule measures distances on: the raw coordinates, or, on LoRA, the product space of
``aggregators/lora_space.py``. Rules always *combine* in coordinate space (what was sent).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from fedfm.core.types import State

Space = Literal["coordinates", "lora_product"]


def names_of(state: State) -> list[str]:
    return [k for k, t in state.items() if t.is_floating_point()]


def stack(state: State, deltas: Sequence[State]) -> torch.Tensor:
    """(n, d) float64: one row per client delta."""
    if not deltas:
        raise ValueError("the rule needs at least one update")
    names = names_of(state)
    return torch.stack([torch.cat([d[k].to(torch.float64).reshape(-1) for k in names]) for d in deltas])


def unstack(state: State, row: torch.Tensor) -> State:
    """The inverse of one row of ``stack``, cast to the State's dtypes."""
    out: State = {}
    offset = 0
    for k in names_of(state):
        n = state[k].numel()
        out[k] = row[offset : offset + n].reshape(state[k].shape).to(state[k].dtype)
        offset += n
    for k, t in state.items():
        if k not in out:
            out[k] = torch.zeros_like(t)
    return out


def pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    """(n, n) squared Euclidean distances between the rows of ``x`` (float64), by the Gram
    form ``|a|^2 + |b|^2 - 2 a.b`` (one matmul; float64 keeps its cancellation error near
    1e-16 of the squared norms), clamped at 0, with an exact zero diagonal."""
    x = x.to(torch.float64)
    sq = x.pow(2).sum(1)  # (n,)
    d = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)  # (n, n)
    d.fill_diagonal_(0.0)
    return d


def view(state: State, deltas: Sequence[State], space: Space) -> torch.Tensor:
    if space == "coordinates":
        return stack(state, deltas)
    from fedfm.aggregators.lora_space import product_rows

    return product_rows(state, deltas)


def mean_of(state: State, deltas: Sequence[State], idx: Sequence[int]) -> State:
    """Unweighted mean of the chosen deltas, in coordinate space."""
    x = stack(state, [deltas[i] for i in idx])
    return unstack(state, x.mean(0))
