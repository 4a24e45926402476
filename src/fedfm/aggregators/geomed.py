"""Geometric median by the smoothed Weiszfeld algorithm: RFA (Pillutla, Kakade and
Harchaoui 2022, "Robust Aggregation for Federated Learning").

The geometric median of updates x_i with weights a_i minimises ``sum_i a_i ||v - x_i||``.
RFA approximates it by Weiszfeld iterations smoothed by ``nu > 0`` (so a point equal to
the current estimate does not divide by zero):

    b_i = a_i / max(nu, ||v - x_i||)
    v  <- sum_i b_i x_i / sum_i b_i

starting from the weighted mean, for at most ``max_iter`` iterations, stopping early when
the objective improves by less than ``tol`` (relative). ``weighted: false`` uses equal
weights instead of the clients' example counts. The counts are what clients report, and
nothing checks them: with ``weighted: true`` (the default, RFA's alpha) one attacker that
claims many examples moves the result toward its update (0, 0, 0, 0, 100 weighted 1, 1,
1, 1, 5: 92.09 after 10 iterations; unweighted: 0.00002), so use ``weighted: false`` where the
counts cannot be trusted. A fixed point satisfies
``sum_i b_i (x_i - v) = 0``. Written here because it is ten lines on the rows of one
matrix; the libraries that have it (e.g. ``geom_median``) would add a dependency for them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.base import normalized, register_aggregator
from fedfm.aggregators.flat import stack, unstack
from fedfm.core.types import State


class GeoMedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nu: float = Field(1e-6, gt=0, description="smoothing: distances below nu count as nu")
    max_iter: int = Field(10, ge=1, description="Weiszfeld iterations at most")
    tol: float = Field(1e-6, ge=0, description="stop when the objective improves by less than this fraction")
    weighted: bool = Field(True, description="weight clients by their reported example counts (RFA's alpha); false where the counts cannot be trusted")


def objective(x: torch.Tensor, a: torch.Tensor, v: torch.Tensor) -> float:
    return float((a * (x - v).norm(dim=1)).sum())


def weiszfeld(x: torch.Tensor, a: torch.Tensor, nu: float, max_iter: int, tol: float) -> tuple[torch.Tensor, int]:
    """x (n, d), a (n,) summing to 1 -> (smoothed geometric median (d,), iterations run)."""
    v = (a[:, None] * x).sum(0)
    obj = objective(x, a, v)
    for it in range(1, max_iter + 1):
        b = a / (x - v).norm(dim=1).clamp_min(nu)  # (n,)
        v = (b[:, None] * x).sum(0) / b.sum()
        new = objective(x, a, v)
        if obj - new <= tol * max(obj, 1e-30):
            return v, it
        obj = new
    return v, max_iter


def geometric_median(state: State, deltas: Sequence[State], weights: Sequence[float], params: GeoMedParams) -> State:
    x = stack(state, deltas)
    a = normalized(weights) if params.weighted else torch.full((len(deltas),), 1.0 / len(deltas), dtype=torch.float64)
    v, _ = weiszfeld(x, a, params.nu, params.max_iter, params.tol)
    return unstack(state, v)


register_aggregator("geometric_median", geometric_median, GeoMedParams)
