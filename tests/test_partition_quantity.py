"""Quantity skew honours min_size: every client gets min_size first, the rest is split by
the Dirichlet shares with exact integer apportionment; sizes sum to the pool."""

from __future__ import annotations

import numpy as np
import pytest

from fedfm.data.partition import DirichletParams, apportion, quantity

POOL = np.zeros(20, dtype=int)


def sizes(n=8, alpha=0.2, min_size=2, seed=0, pool=POOL):
    parts = quantity(pool, None, n, np.random.default_rng(seed), DirichletParams(alpha=alpha, min_size=min_size))
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(len(pool)))  # disjoint, covers the pool
    return [len(p) for p in parts]


def test_every_client_gets_min_size_and_the_sizes_sum_to_the_pool():
    # Seed 0 draws shares 0.0042, 0.0000, 0.2370, 0.1542, 0.2645, 0.2702, 0.0001, 0.0699;
    # the 4 examples left after 8 x 2 are 0.017, 0, 0.948, 0.617, 1.058, 1.081, 0.000, 0.280
    # of them: floors give clients 4 and 5 one each, the largest remainders (0.948, 0.617)
    # give clients 2 and 3 one each. (Clamping each size up used to give [2,2,4,3,5,4,0,0].)
    got = sizes()
    assert got == [2, 2, 3, 3, 3, 3, 2, 2]
    assert sum(got) == 20 and min(got) >= 2
    assert sizes() == got  # same seed, same sizes


def test_without_min_size_the_shares_decide_alone():
    got = sizes(min_size=0)
    assert got == [0, 0, 5, 3, 5, 6, 0, 1]  # 20 x the shares above, largest remainder
    assert sum(got) == 20


def test_min_size_above_the_pool_names_the_field():
    with pytest.raises(ValueError, match=r"federation.partitioner.min_size=3: 8 clients x 3 = 24 examples, but the training pool holds 20"):
        sizes(min_size=3)


def test_apportion_is_exact():
    assert apportion(4, np.array([0.625, 0.125, 0.25])).tolist() == [3, 0, 1]  # 2.5, 0.5, 1: tie to the lower index
    assert apportion(7, np.array([1 / 3, 1 / 3, 1 / 3])).tolist() == [3, 2, 2]
    assert apportion(0, np.array([0.9, 0.1])).tolist() == [0, 0]
