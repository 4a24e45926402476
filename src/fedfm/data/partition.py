"""Partitioners: how a pool of examples is split among clients (non-IID included).

Each partitioner is a plain function ``(labels, groups, n_clients, rng, params) -> list of
index arrays`` over the training pool, deterministic given the generator.

- ``iid``: uniform random split into equal parts.
- ``dirichlet``: Dirichlet label skew, the per-class variant: each class's examples are
  split over the clients by its own draw p_c ~ Dir(alpha) (Yurochkin et al. 2019,
  "Bayesian Nonparametric Federated Learning of Neural Networks"; the NIID-Bench split of
  Li, Diao, Chen and He 2022, "Federated Learning on Non-IID Data Silos: An Experimental
  Study", which also redraws until every client has ``min_size`` examples; here at most
  100 draws). Client sizes follow from the draws. Not the per-client variant of Hsu, Qi
  and Brown 2019 ("Measuring the Effects of Non-Identical Data Distribution"), which
  draws each client's label mix q ~ Dir(alpha p), p the class prior, with equal sizes.
- ``natural``: whole groups (movie, speaker, language) per client, never split. With
  ``federation.examples_per_client``, ``subsample`` says which of a client's rows it keeps
  (applied in data/federated.py):
  ``whole_groups`` (default) keeps whole groups in a seeded random order until the cap and
  cuts the group that crosses it to its first rows in file order;
  ``random`` keeps a seeded uniform sample of all the client's rows;
  ``stratified`` keeps a seeded sample with the client's own label proportions.
  ``whole_groups`` keeps the most of each owner's data together (the quickstart uses it);
  on a file sorted by label its cut group can leave a client with one class only, which
  ``fedfm data describe`` and ``fedfm run`` report: use ``random`` or ``stratified`` there.
- ``shards``: sort by label, cut into ``shards_per_client * n`` shards, deal them out
  (McMahan et al. 2017, the pathological non-IID split).
- ``quantity``: quantity skew, labels IID: each client first gets ``min_size`` examples,
  then the rest is split in proportion to one Dir(alpha) draw over the clients (largest
  remainder, so the sizes sum to the pool exactly); ``n * min_size`` above the pool is
  refused naming ``federation.partitioner.min_size``.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.registry import NoParams, Registry

Partitioner = Callable[[np.ndarray, "np.ndarray | None", int, np.random.Generator, BaseModel], list[np.ndarray]]
partitioners: Registry[Partitioner] = Registry("federation.partitioner")


def register_partitioner(name: str, fn: Partitioner, params: type[BaseModel] = NoParams) -> Partitioner:
    return partitioners.register(name, fn, params)


class DirichletParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.5, gt=0)
    min_size: int = Field(1, ge=0)


class NaturalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subsample: Literal["whole_groups", "random", "stratified"] = Field(
        "whole_groups",
        description="rows kept under examples_per_client: whole groups, the last one cut in file order "
        "(whole_groups); a seeded sample of the client's rows (random); one with its label shares (stratified)",
    )


class ShardParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shards_per_client: int = Field(2, ge=1)


def iid(labels, groups, n, rng, params) -> list[np.ndarray]:
    perm = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, n)]


def dirichlet(labels, groups, n, rng, params: DirichletParams) -> list[np.ndarray]:
    labels = np.asarray(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n, params.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= params.min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"federation.partitioner.alpha={params.alpha}: could not give every one of {n} clients "
        f"at least min_size={params.min_size} examples; raise alpha or lower min_size"
    )


def natural(labels, groups, n, rng, params) -> list[np.ndarray]:
    if groups is None:
        raise ValueError("federation.partitioner 'natural' needs a group column (data.group_column)")
    groups = np.asarray(groups)
    names = rng.permutation(np.unique(groups))
    if len(names) < n:
        raise ValueError(
            f"federation.clients={n} exceeds the {len(names)} groups available to the natural partitioner "
            f"(the groups of the test set are held out)"
        )
    members = {g: np.flatnonzero(groups == g) for g in names}
    # Largest groups first, each to the currently smallest client: balanced sizes.
    order = sorted(names, key=lambda g: -len(members[g]))
    parts: list[list[int]] = [[] for _ in range(n)]
    for g in order:
        k = min(range(n), key=lambda i: (len(parts[i]), i))
        parts[k].extend(members[g].tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def shards(labels, groups, n, rng, params: ShardParams) -> list[np.ndarray]:
    labels = np.asarray(labels)
    if n * params.shards_per_client > len(labels):
        raise ValueError(
            f"federation.partitioner.shards_per_client={params.shards_per_client}: {n} clients x "
            f"{params.shards_per_client} = {n * params.shards_per_client} shards, but the training pool holds "
            f"{len(labels)} examples (a shard needs one at least); lower shards_per_client or the clients"
        )
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n * params.shards_per_client)
    deal = rng.permutation(len(pieces))
    return [
        np.sort(np.concatenate([pieces[j] for j in deal[k :: n]])) for k in range(n)
    ]


def apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """``total`` split into integers proportional to ``shares`` (summing to 1), exactly:
    floors first, then one more to the largest remainders (ties to the lower index)."""
    exact = shares * total
    sizes = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - sizes), kind="stable")[: total - int(sizes.sum())]:
        sizes[k] += 1
    return sizes


def quantity(labels, groups, n, rng, params: DirichletParams) -> list[np.ndarray]:
    """Each client gets ``min_size`` examples, then the other ``N - n * min_size`` are
    split by Dir(alpha) shares (largest remainder): sizes sum to N, none below min_size."""
    total = len(labels)
    if n * params.min_size > total:
        raise ValueError(
            f"federation.partitioner.min_size={params.min_size}: {n} clients x {params.min_size} = "
            f"{n * params.min_size} examples, but the training pool holds {total}; lower min_size or the clients"
        )
    perm = rng.permutation(total)
    shares = rng.dirichlet(np.full(n, params.alpha))
    sizes = params.min_size + apportion(total - n * params.min_size, shares)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


register_partitioner("iid", iid)
register_partitioner("dirichlet", dirichlet, DirichletParams)
register_partitioner("natural", natural, NaturalParams)
register_partitioner("shards", shards, ShardParams)
register_partitioner("quantity", quantity, DirichletParams)
