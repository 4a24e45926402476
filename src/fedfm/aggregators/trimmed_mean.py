"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran and Bartlett 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").

Every coordinate drops the ``k = floor(beta * n)`` largest and the ``k`` smallest client
values and averages the remaining ``n - 2k``, unweighted (as in the paper: a client's
claimed number of examples is not trusted). ``beta = 0`` is the plain mean. It needs
``2k < n``; a configuration where that fails is refused before training
(``aggregators/robust_checks.py``). The coordinate-wise median is ``median``
(``aggregators/median.py``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.base import TooFewUpdates, register_aggregator
from fedfm.core.types import State


class TrimmedMeanParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, ge=0, le=0.5, description="fraction of clients trimmed at each end, per coordinate")


def trim_count(beta: float, n: int) -> int:
    return int(math.floor(beta * n + 1e-9))


def trimmed_mean(state: State, deltas: Sequence[State], weights: Sequence[float], params: TrimmedMeanParams) -> State:
    n = len(deltas)
    if n == 0:
        raise ValueError("trimmed_mean needs at least one update")
    k = trim_count(params.beta, n)
    if 2 * k >= n:
        raise TooFewUpdates(f"trimmed_mean: beta={params.beta} trims {k} of {n} updates at each end, leaving none (needs 2k < n)",
                            n + 1)
    out: State = {}
    for name in state:
        ordered = torch.stack([d[name].to(torch.float64) for d in deltas]).sort(dim=0).values  # (n, *shape)
        out[name] = ordered[k : n - k].mean(0).to(state[name].dtype)
    return out


register_aggregator("trimmed_mean", trimmed_mean, TrimmedMeanParams)
