"""Client sampling: counts, determinism given (seed, round, attempt), weighting by size."""

from __future__ import annotations

from collections import Counter

import pytest

from fedfm.config import ConfigError, from_dict
from fedfm.core.types import ClientSpec
from fedfm.runtime.sampling import clients_per_round, sample_clients, sample_indices


def exp_with(tmp_path, **fed):
    from conftest import tiny_config

    raw = tiny_config(tmp_path)
    raw["federation"].update({"clients": 8, **fed})
    return from_dict(raw)


class Sized(ClientSpec):
    """A client with a given number of examples (without holding their indices)."""

    def __init__(self, cid: int, n: int):
        super().__init__(cid=cid, indices=[])
        self.n = n

    @property
    def num_examples(self) -> int:
        return self.n


def clients(sizes):
    return [Sized(i, n) for i, n in enumerate(sizes)]


def test_clients_per_round_from_count_or_fraction(tmp_path):
    assert clients_per_round(exp_with(tmp_path).federation, 8) == 8
    assert clients_per_round(exp_with(tmp_path, clients_per_round=3).federation, 8) == 3
    assert clients_per_round(exp_with(tmp_path, fraction=0.25).federation, 8) == 2  # 0.25 * 8
    assert clients_per_round(exp_with(tmp_path, fraction=0.3).federation, 8) == 3  # ceil(2.4)
    assert clients_per_round(exp_with(tmp_path, fraction=0.01).federation, 8) == 1


def test_sampling_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="clients_per_round and fraction"):
        exp_with(tmp_path, clients_per_round=2, fraction=0.5)
    with pytest.raises(ConfigError, match="federation.sampling"):
        exp_with(tmp_path, sampling="random")
    with pytest.raises(ConfigError, match="min_clients"):
        exp_with(tmp_path, min_clients=9)


def test_sampling_is_deterministic_per_seed_round_and_attempt(tmp_path):
    exp = exp_with(tmp_path, clients_per_round=3)
    pool = clients([10] * 8)
    draws = {r: [c.cid for c in sample_clients(exp, pool, r)] for r in range(1, 21)}
    again = {r: [c.cid for c in sample_clients(exp, pool, r)] for r in reversed(range(1, 21))}
    assert draws == again  # the order rounds are drawn in does not matter (resume)
    assert all(len(d) == 3 and len(set(d)) == 3 and d == sorted(d) for d in draws.values())
    assert len({tuple(d) for d in draws.values()}) > 5  # rounds differ
    retry = [[c.cid for c in sample_clients(exp, pool, r, attempt=1)] for r in range(1, 21)]
    assert retry != list(draws.values())  # a retried round draws afresh
    other = exp_with(tmp_path, clients_per_round=3)
    other.seed = 1
    assert [[c.cid for c in sample_clients(other, pool, r)] for r in range(1, 21)] != list(draws.values())


def test_weighted_sampling_follows_data_size():
    # Two clients hold 1e9 examples, two hold 1: the big ones are (almost surely) always drawn.
    big = [1, 10**9, 1, 10**9]
    for seed in range(50):
        assert sample_indices(4, 2, big, seed) == [1, 3]
    # Uniform: every client appears about k/n of the time (2000 draws of 2 out of 4).
    counts = Counter(i for seed in range(2000) for i in sample_indices(4, 2, None, seed))
    assert all(abs(counts[i] / 2000 - 0.5) < 0.05 for i in range(4))
    # Weighted with sizes 1:3 (k=1): the larger is drawn ~75% of the time.
    counts = Counter(sample_indices(2, 1, [1, 3], seed)[0] for seed in range(2000))
    assert abs(counts[1] / 2000 - 0.75) < 0.04


def test_weighted_sampling_in_a_config(tmp_path):
    exp = exp_with(tmp_path, clients_per_round=2, sampling="weighted")
    pool = clients([1, 1, 1, 1, 1, 1, 10**9, 10**9])
    assert {tuple(c.cid for c in sample_clients(exp, pool, r)) for r in range(1, 10)} == {(6, 7)}
