"""Coordinate-wise median of the client deltas (Yin, Chen, Ramchandran and Bartlett 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").

Every coordinate takes the median of the clients' values, unweighted (the rule's
robustness comes from ignoring how much data a client claims). With an even number of
clients the median is the mean of the two middle values (``numpy.median``'s convention,
not ``torch.median``'s lower one), so the rule is symmetric in the clients.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.base import register_aggregator
from fedfm.core.types import State


def coordinate_median(state: State, deltas: Sequence[State], weights: Sequence[float], params=None) -> State:
    if not deltas:
        raise ValueError("median needs at least one update")
    out: State = {}
    for name in state:
        ordered = torch.stack([d[name].to(torch.float64) for d in deltas]).sort(dim=0).values  # (n, *shape)
        n = len(deltas)
        mid = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        out[name] = mid.to(state[name].dtype)
    return out


register_aggregator("median", coordinate_median)
