"""From one table to a federation: held-out test set, client partitions, size caps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedfm.core.types import ClientSpec
from fedfm.data.partition import partitioners


@dataclass
class Federation:
    frame: pd.DataFrame
    clients: list[ClientSpec]
    test_indices: np.ndarray


def _held_out(frame: pd.DataFrame, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(test, pool) indices. With groups: whole groups are held out, in a seeded random
    order, until they hold at least ``n_test`` rows; the test set is ``n_test`` of those
    rows drawn at random, and the rest of the held-out groups' rows are used nowhere (not
    in the test set, whose size is ``n_test`` exactly, and not in the pool, since no
    client may own a row of a group it is tested on)."""
    n = len(frame)
    if n_test >= n:
        raise ValueError(f"federation.test_examples={n_test} leaves no training data ({n} rows)")
    if "group" not in frame.columns:
        perm = rng.permutation(n)
        return np.sort(perm[:n_test]), np.sort(perm[n_test:])
    groups = frame["group"].to_numpy()
    names = rng.permutation(np.unique(groups))
    taken: list[np.ndarray] = []
    count = 0
    for g in names:
        if count >= n_test:
            break
        members = np.flatnonzero(groups == g)
        taken.append(members)
        count += len(members)
    held = np.concatenate(taken)
    test = np.sort(rng.permutation(held)[:n_test])
    pool = np.flatnonzero(~np.isin(groups, groups[held]))
    if len(pool) == 0:
        raise ValueError(
            f"federation.test_examples={n_test}: the test set holds out whole groups until they hold "
            f"{n_test} rows, which took all {len(names)} groups ({n} rows) and leaves no training data; "
            f"lower federation.test_examples"
        )
    return test, pool


def _stratified(part: np.ndarray, labels: np.ndarray, limit: int, rng) -> np.ndarray:
    """A seeded sample of ``limit`` rows whose label counts follow the part's own shares
    (largest remainder: floors first, then the largest fractions, ties by label)."""
    values, counts = np.unique(labels, return_counts=True)
    exact = counts * limit / len(part)
    quota = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - quota), kind="stable")[: limit - quota.sum()]:
        quota[k] += 1
    taken = [rng.choice(part[labels == y], size=q, replace=False) for y, q in zip(values, quota) if q]
    return np.sort(np.concatenate(taken))


def _cap(part: np.ndarray, limit: int | None, frame: pd.DataFrame, how: str | None, rng) -> np.ndarray:
    """At most ``limit`` of ``part``: ``how`` is the natural partitioner's ``subsample``
    (None for the other partitioners: a seeded uniform sample)."""
    if limit is None or len(part) <= limit:
        return part
    if how == "stratified" and "label" in frame.columns:
        return _stratified(part, frame["label"].to_numpy()[part], limit, rng)
    if how == "whole_groups" and "group" in frame.columns:
        groups = frame["group"].to_numpy()[part]
        order = rng.permutation(np.unique(groups))
        rank = {g: i for i, g in enumerate(order)}
        keyed = sorted(range(len(part)), key=lambda i: (rank[groups[i]], part[i]))
        return np.sort(part[np.array(keyed[:limit])])
    return np.sort(rng.choice(part, size=limit, replace=False))


def _enough_groups(frame: pd.DataFrame, pool_groups: np.ndarray, fed_cfg) -> None:
    """The natural partitioner needs a group per client, among those the test set left."""
    left, total = len(np.unique(pool_groups)), frame["group"].nunique()
    if fed_cfg.clients > left:
        raise ValueError(
            f"federation.clients={fed_cfg.clients} exceeds the {left} groups left for clients by the natural "
            f"partitioner: the data has {total} groups and the test set (federation.test_examples="
            f"{fed_cfg.test_examples}) holds out {total - left} whole group(s); lower federation.clients "
            f"or federation.test_examples"
        )


def build_federation(frame: pd.DataFrame, fed_cfg, seed: int) -> Federation:
    """Deterministic given ``seed``: the same config always yields the same clients."""
    rng = np.random.default_rng(seed)
    test, pool = _held_out(frame, fed_cfg.test_examples, rng)
    spec = fed_cfg.partitioner
    entry = partitioners.get(spec.name)
    params = partitioners.parse(spec.name, spec.params(), "federation.partitioner")
    labels = frame["label"].to_numpy()[pool] if "label" in frame.columns else np.zeros(len(pool), int)
    groups = frame["group"].to_numpy()[pool] if "group" in frame.columns else None
    if spec.name == "natural" and groups is not None:
        _enough_groups(frame, groups, fed_cfg)
    parts = entry.obj(labels, groups, fed_cfg.clients, rng, params)
    how = getattr(params, "subsample", None) if spec.name == "natural" else None
    clients = []
    for cid, local in enumerate(parts):
        idx = _cap(pool[local], fed_cfg.examples_per_client, frame, how, rng)
        if len(idx) == 0:
            raise ValueError(f"client {cid} received no examples; change federation.partitioner or clients")
        clients.append(ClientSpec(cid=cid, indices=idx.tolist()))
    return Federation(frame=frame, clients=clients, test_indices=test)


def describe(fed: Federation) -> pd.DataFrame:
    """Per-client size, label histogram and group count (``fedfm data describe``)."""
    rows = []
    has_label = "label" in fed.frame.columns
    labels = sorted(fed.frame["label"].unique()) if has_label else []
    for c in fed.clients:
        sub = fed.frame.iloc[c.indices]
        row = {"client": c.cid, "examples": len(sub)}
        if "group" in sub.columns:
            row["groups"] = sub["group"].nunique()
        for y in labels:
            row[f"label_{y}"] = int((sub["label"] == y).sum())
        rows.append(row)
    test = fed.frame.iloc[fed.test_indices]
    row = {"client": "test", "examples": len(test)}
    if "group" in test.columns:
        row["groups"] = test["group"].nunique()
    for y in labels:
        row[f"label_{y}"] = int((test["label"] == y).sum())
    rows.append(row)
    return pd.DataFrame(rows)
