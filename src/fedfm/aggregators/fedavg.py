"""FedAvg: the example-weighted mean of client deltas (McMahan et al. 2017,
"Communication-Efficient Learning of Deep Networks from Decentralized Data")."""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.base import normalized, register_aggregator
from fedfm.core.types import State


def fedavg(state: State, deltas: Sequence[State], weights: Sequence[float], params=None) -> State:
    w = normalized(weights)
    out: State = {}
    for name in state:
        acc = torch.zeros_like(state[name], dtype=torch.float64)
        for wi, d in zip(w.tolist(), deltas):
            acc.add_(d[name].to(torch.float64), alpha=wi)
        out[name] = acc.to(state[name].dtype)
    return out


register_aggregator("fedavg", fedavg)
