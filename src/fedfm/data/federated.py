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
    """(test, pool) indices. With groups, the test set comes from whole groups no client owns."""
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
        raise ValueError("federation.test_examples: the held-out groups leave no training data")
    return test, pool


def _cap(part: np.ndarray, limit: int | None, frame: pd.DataFrame, whole_groups: bool, rng) -> np.ndarray:
    if limit is None or len(part) <= limit:
        return part
    if whole_groups and "group" in frame.columns:
        groups = frame["group"].to_numpy()[part]
        order = rng.permutation(np.unique(groups))
        rank = {g: i for i, g in enumerate(order)}
        keyed = sorted(range(len(part)), key=lambda i: (rank[groups[i]], part[i]))
        return np.sort(part[np.array(keyed[:limit])])
    return np.sort(rng.choice(part, size=limit, replace=False))


def build_federation(frame: pd.DataFrame, fed_cfg, seed: int) -> Federation:
    """Deterministic given ``seed``: the same config always yields the same clients."""
    rng = np.random.default_rng(seed)
    test, pool = _held_out(frame, fed_cfg.test_examples, rng)
    spec = fed_cfg.partitioner
    entry = partitioners.get(spec.name)
    params = partitioners.parse(spec.name, spec.params(), "federation.partitioner")
    labels = frame["label"].to_numpy()[pool] if "label" in frame.columns else np.zeros(len(pool), int)
    groups = frame["group"].to_numpy()[pool] if "group" in frame.columns else None
    parts = entry.obj(labels, groups, fed_cfg.clients, rng, params)
    clients = []
    for cid, local in enumerate(parts):
        idx = _cap(pool[local], fed_cfg.examples_per_client, frame, spec.name == "natural", rng)
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
