"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine
Learning with Adversaries: Byzantine Tolerant Gradient Descent").

With ``n`` updates of which at most ``f`` are Byzantine, each update ``i`` gets the score

    s(i) = sum of the squared distances from x_i to its n - f - 2 nearest other updates

Krum returns the update with the smallest score; Multi-Krum averages (unweighted) the
``m`` updates with the smallest scores (ties go to the lower client position). The
guarantee needs ``n > 2f + 2``; fewer clients per round is refused at config time
(``aggregators/robust_checks.py``). A round that ends up with fewer than ``f + 3`` updates
(dropouts, failed or rejected clients) is retried or skipped by the round loop
(``robust_checks.fewest_updates``); called directly with so few, the rule raises, naming
the ``federation.min_clients`` that would retry or skip such a round.

``space: lora_product`` measures the distances between the clients' effective LoRA weight
changes instead of between their (A, B) coordinates (``aggregators/lora_space.py``); the
chosen clients' sent deltas are what is averaged either way.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.base import TooFewUpdates, register_aggregator
from fedfm.aggregators.flat import Space, mean_of, pairwise_sq_dists, view
from fedfm.core.types import State


class KrumParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    f: int = Field(1, ge=0, description="number of Byzantine clients per round the rule tolerates")
    space: Space = Field("coordinates", description="distances on the sent coordinates or on LoRA's product B@A")


class MultiKrumParams(KrumParams):
    m: int = Field(..., ge=1, description="number of lowest-score updates averaged")


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """(n,) Krum scores of the rows of ``x`` (n, d)."""
    n = x.shape[0]
    k = n - f - 2
    if k < 1:
        raise TooFewUpdates(f"krum: {n} updates with f={f} leaves n - f - 2 = {k} neighbours (needs n >= f + 3; the guarantee needs "
                         f"n > 2f + 2); federation.min_clients: {f + 3} retries or skips a round this small", f + 3)
    d = pairwise_sq_dists(x)  # (n, n)
    d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, :k].sum(1)


def krum_order(x: torch.Tensor, f: int) -> list[int]:
    """Row indices by increasing score (stable: ties keep the lower index first)."""
    scores = krum_scores(x, f)
    return sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))


def krum(state: State, deltas: Sequence[State], weights: Sequence[float], params: KrumParams) -> State:
    best = krum_order(view(state, deltas, params.space), params.f)[0]
    return {k: deltas[best][k].to(state[k].dtype) for k in state}


def multi_krum(state: State, deltas: Sequence[State], weights: Sequence[float], params: MultiKrumParams) -> State:
    if params.m > len(deltas):
        raise TooFewUpdates(f"multi_krum: m={params.m} exceeds the {len(deltas)} updates of the round; "
                         f"federation.min_clients: {params.m} retries or skips a round this small", params.m)
    chosen = krum_order(view(state, deltas, params.space), params.f)[: params.m]
    return mean_of(state, deltas, chosen)


register_aggregator("krum", krum, KrumParams)
register_aggregator("multi_krum", multi_krum, MultiKrumParams)
