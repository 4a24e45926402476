"""Partitioners: sizes, disjointness, measurable skew, determinism; held-out test groups."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedfm.config import FederationConfig
from fedfm.data import build_federation, describe
from fedfm.data.partition import DirichletParams, ShardParams, dirichlet, iid, natural, quantity, shards

LABELS = np.array([0] * 50 + [1] * 50)
GROUPS = np.array([f"g{i // 10}" for i in range(100)])  # 10 groups of 10


def _check_disjoint_cover(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())) == n


def test_iid_sizes_and_cover():
    parts = iid(LABELS, None, 4, np.random.default_rng(0), None)
    assert [len(p) for p in parts] == [25, 25, 25, 25]
    _check_disjoint_cover(parts, 100)


def test_shards_two_labels_each_client_at_most_two_shards():
    parts = shards(LABELS, None, 5, np.random.default_rng(0), ShardParams(shards_per_client=2))
    _check_disjoint_cover(parts, 100)
    assert [len(p) for p in parts] == [20] * 5  # 10 shards of 10, two per client
    # Each shard holds a single label (sorted by label, 50 per label = 5 shards per label).
    for p in parts:
        assert len(np.unique(LABELS[p])) <= 2


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = np.repeat(np.arange(4), 250)  # 4 classes x 250

    def skew(alpha):
        parts = dirichlet(labels, None, 10, np.random.default_rng(1), DirichletParams(alpha=alpha))
        _check_disjoint_cover(parts, 1000)
        # Mean total-variation distance between client label histograms and the global one.
        tv = []
        for p in parts:
            h = np.bincount(labels[p], minlength=4) / max(len(p), 1)
            tv.append(0.5 * np.abs(h - 0.25).sum())
        return float(np.mean(tv))

    assert skew(100.0) < 0.1  # nearly IID
    assert skew(0.1) > 0.4  # strongly skewed
    assert skew(0.1) > skew(1.0) > skew(100.0)


def test_natural_keeps_groups_whole_and_balanced():
    parts = natural(LABELS, GROUPS, 3, np.random.default_rng(0), None)
    _check_disjoint_cover(parts, 100)
    owners = {}
    for k, p in enumerate(parts):
        for g in np.unique(GROUPS[p]):
            assert g not in owners, "a group was split across clients"
            owners[g] = k
    assert sorted(len(p) for p in parts) == [30, 30, 40]  # 10 groups of 10 over 3 clients


def test_natural_more_clients_than_groups_names_the_key():
    with pytest.raises(ValueError, match="federation.clients=11 exceeds the 10 groups"):
        natural(LABELS, GROUPS, 11, np.random.default_rng(0), None)


def test_quantity_skew_sizes_vary():
    parts = quantity(LABELS, None, 4, np.random.default_rng(0), DirichletParams(alpha=0.3))
    _check_disjoint_cover(parts, 100)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 2 * sizes[0]


def _frame():
    return pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": LABELS, "group": GROUPS})


@pytest.mark.parametrize("name", ["iid", "dirichlet", "natural", "shards", "quantity"])
def test_federation_deterministic_and_test_groups_held_out(name):
    cfg = FederationConfig(clients=3, partitioner={"name": name}, test_examples=15)
    a = build_federation(_frame(), cfg, seed=7)
    b = build_federation(_frame(), cfg, seed=7)
    assert [c.indices for c in a.clients] == [c.indices for c in b.clients]
    assert a.test_indices.tolist() == b.test_indices.tolist()
    assert len(a.test_indices) == 15
    test_groups = set(GROUPS[a.test_indices])
    for c in a.clients:
        assert not test_groups & set(GROUPS[c.indices]), "a client owns a test group"
        assert not set(c.indices) & set(a.test_indices.tolist())
    other = build_federation(_frame(), cfg, seed=8)
    assert [c.indices for c in other.clients] != [c.indices for c in a.clients]


def test_examples_per_client_cap_and_describe():
    cfg = FederationConfig(clients=2, partitioner={"name": "natural"}, test_examples=10, examples_per_client=25)
    fed = build_federation(_frame(), cfg, seed=0)
    assert [c.num_examples for c in fed.clients] == [25, 25]
    table = describe(fed)
    assert table["examples"].tolist() == [25, 25, 10]
    assert (table["label_0"] + table["label_1"]).tolist() == [25, 25, 10]


def test_held_out_groups_rows_beyond_test_examples_are_used_nowhere():
    from fedfm.data.federated import _held_out

    groups = np.array(["a"] * 32 + ["b"] * 35 + ["c"] * 40 + ["d"] * 40)
    test, pool = _held_out(pd.DataFrame({"group": groups}), 60, np.random.default_rng(1))
    # Seed 1 holds out a and b (67 rows): 60 of them are the test set, 7 are left over.
    assert set(groups[test]) == {"a", "b"} and len(test) == 60
    assert set(groups[pool]) == {"c", "d"} and len(pool) == 80
    unused = set(range(147)) - set(test.tolist()) - set(pool.tolist())
    assert len(unused) == 7 and set(groups[list(unused)]) <= {"a", "b"}
