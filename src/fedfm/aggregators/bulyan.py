"""Bulyan (El Mhamdi, Guerraoui and Rouault 2018, "The Hidden Vulnerability of
Distributed Learning in Byzantium").

1. Selection: ``theta = n - 2f`` updates, chosen one at a time by Krum over the updates
   not yet chosen (each time the lowest Krum score, with the same ``f``);
2. aggregation, per coordinate: of the theta selected values, the ``beta = theta - 2f``
   closest to their coordinate-wise median are averaged.

Both steps are unweighted. The paper needs ``n >= 4f + 3``; fewer clients per round is
refused at config time (``aggregators/robust_checks.py``). When the shrinking pool leaves
Krum fewer than one neighbour (the last picks with small f), the remaining update with the
lowest score over all its neighbours is taken. ``space: lora_product`` runs the Krum
selection on LoRA's product space (``aggregators/lora_space.py``); the coordinate step is
always on the sent coordinates.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.base import TooFewUpdates, register_aggregator
from fedfm.aggregators.flat import stack, unstack, view, pairwise_sq_dists
from fedfm.aggregators.krum import KrumParams
from fedfm.core.types import State


def bulyan_select(x: torch.Tensor, f: int) -> list[int]:
    """Indices (into the rows of x) of the theta = n - 2f updates picked by iterated Krum."""
    n = x.shape[0]
    theta = n - 2 * f
    d = pairwise_sq_dists(x)
    pool, chosen = list(range(n)), []
    while len(chosen) < theta:
        sub = d[pool][:, pool].clone()
        sub.fill_diagonal_(float("inf"))
        k = max(1, min(len(pool) - 1, len(pool) - f - 2))
        scores = sub.sort(dim=1).values[:, :k].sum(1) if len(pool) > 1 else torch.zeros(1, dtype=d.dtype)
        best = min(range(len(pool)), key=lambda i: (float(scores[i]), pool[i]))
        chosen.append(pool.pop(best))
    return chosen


def closest_to_median_mean(values: torch.Tensor, beta: int) -> torch.Tensor:
    """values (theta, d) -> (d,): per coordinate, the mean of the beta values nearest the median."""
    theta = values.shape[0]
    ordered = values.sort(dim=0).values
    med = ordered[theta // 2] if theta % 2 else (ordered[theta // 2 - 1] + ordered[theta // 2]) / 2  # (d,)
    idx = (values - med).abs().argsort(dim=0, stable=True)[:beta]  # (beta, d)
    return values.gather(0, idx).mean(0)


def bulyan(state: State, deltas: Sequence[State], weights: Sequence[float], params: KrumParams) -> State:
    n, f = len(deltas), params.f
    if n < 4 * f + 3:
        raise TooFewUpdates(f"bulyan: {n} updates with f={f}; Bulyan needs n >= 4f + 3 = {4 * f + 3}; "
                         f"federation.min_clients: {4 * f + 3} retries or skips a round this small", 4 * f + 3)
    chosen = bulyan_select(view(state, deltas, params.space), f)
    x = stack(state, [deltas[i] for i in chosen])  # (theta, d)
    return unstack(state, closest_to_median_mean(x, len(chosen) - 2 * f))


register_aggregator("bulyan", bulyan, KrumParams)
