"""Client sampling: which clients a round asks (McMahan et al. 2017, "Communication-
Efficient Learning of Deep Networks from Decentralized Data": a fraction C of the clients
per round).

- ``uniform``: ``k`` distinct clients, each equally likely.
- ``weighted``: ``k`` distinct clients drawn with probability proportional to their number
  of examples (successive draws without replacement, numpy's ``Generator.choice``).

The number per round is ``federation.clients_per_round``, or ``ceil(fraction * clients)``,
or every client. The generator is seeded from (seed, round, attempt) only, never from a
global stream, so a round's sample is the same whatever ran before it (resume included);
a retried round (too few clients returned) draws a fresh sample with ``attempt + 1``.

``weighted`` with the ``fedavg`` rule (an example-weighted mean) counts a client's size
twice, in its inclusion and in its weight: with nine clients of 100 examples and one of
300, 2 a round, the large client's expected weight is 15/44 = 0.341 instead of its share
1/4. An equal-weight mean (``trimmed_mean`` with ``beta: 0``) after ``weighted`` sampling
is close to unbiased while every client's k * n_i / N is small. Nothing is refused;
docs/algorithms.md ("Client sampling and example weights") has the table.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fedfm.core.types import ClientSpec
from fedfm.core.seeding import derive_seed

SAMPLING_TAG = 0x5A


def clients_per_round(fed_cfg, n_clients: int) -> int:
    """How many clients a round samples, from ``clients_per_round`` or ``fraction``."""
    if fed_cfg.clients_per_round is not None:
        return min(fed_cfg.clients_per_round, n_clients)
    if fed_cfg.fraction is not None:
        return max(1, min(n_clients, math.ceil(fed_cfg.fraction * n_clients - 1e-9)))
    return n_clients


def sample_indices(n: int, k: int, sizes: Sequence[int] | None, seed: int) -> list[int]:
    """``k`` distinct indices of ``range(n)``, sorted; weighted by ``sizes`` when given."""
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    p = None
    if sizes is not None:
        w = np.asarray(sizes, dtype=np.float64)  # (n,)
        if (w <= 0).any():
            raise ValueError("weighted sampling needs every client to hold at least one example")
        p = w / w.sum()
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False, p=p))


def sample_clients(exp, clients: Sequence[ClientSpec], rnd: int, attempt: int = 0) -> list[ClientSpec]:
    """The clients of round ``rnd`` (attempt ``attempt``), deterministic given the seed."""
    fed = exp.federation
    k = clients_per_round(fed, len(clients))
    if k >= len(clients):
        return list(clients)
    sizes = [c.num_examples for c in clients] if fed.sampling == "weighted" else None
    seed = derive_seed(exp.seed, rnd, attempt, SAMPLING_TAG)
    return [clients[i] for i in sample_indices(len(clients), k, sizes, seed)]
