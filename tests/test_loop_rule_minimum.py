"""A round that failures leave smaller than the aggregator rule can combine is retried or
skipped like one below federation.min_clients (runtime/loop.py), not a stopped run."""

from __future__ import annotations

import json

from conftest import tiny_config, register_failing_middleware

from fedfm.aggregators.robust_checks import fewest_updates
from fedfm.config import from_dict
from fedfm.runtime.local import LocalRuntime


register_failing_middleware("test_loop_fail_round_one", lambda ctx: ctx.round == 1, "broken in round 1")


def test_fewest_updates_by_hand():
    assert fewest_updates("krum", {"f": 1}, 5) == 4  # n - f - 2 >= 1 neighbour
    assert fewest_updates("multi_krum", {"f": 1, "m": 5}, 6) == 5  # m updates averaged
    assert fewest_updates("bulyan", {"f": 1}, 8) == 7  # 4f + 3
    assert fewest_updates("trimmed_mean", {"beta": 0.2}, 10) == 1  # floor(0.2 r) * 2 < r for every r
    assert fewest_updates("fedavg", {}, 10) == 1 and fewest_updates("median", {}, 3) == 1


def test_a_round_failures_leave_too_small_for_krum_is_retried_then_skipped(tmp_path):
    raw = tiny_config(tmp_path, rounds=2, **{
        "federation.clients": 5, "federation.max_retries": 1, "aggregator": {"rule": "krum", "f": 1},
        "federation.roles": [{"name": "broken", "count": 2, "middleware": [{"name": "test_loop_fail_round_one"}]}],
        "train.steps": 1, "runtime": {"progress": False, "threads": 1}})
    out = tmp_path / "run"
    LocalRuntime(from_dict(raw, "<test>"), out).run()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # round 1: 3 of 5 clients train, krum needs 4 (f + 3): retried once, the same two fail, skipped
    assert rows[1]["skipped"] == "3 of the 4 updates aggregator krum needs kept after 2 attempt(s)"
    assert rows[1]["clients"] == [] and len(rows[1]["failed"]) == 4
    assert sorted(rows[2]["clients"]) == [0, 1, 2, 3, 4] and rows[2]["skipped"] is None


def test_the_algorithm_aggregates_nothing_below_the_rule_minimum(tmp_path):
    """After the updates-stage steps (which may leave updates out), 3 updates are below
    Krum's f + 3 = 4: nothing is combined, the loop then retries or skips the round."""
    import torch

    from fedfm.core.types import MODEL, Update
    from fedfm.runtime.algorithm import build_algorithm

    exp = from_dict(tiny_config(tmp_path, **{"federation.clients": 5, "aggregator": {"rule": "krum", "f": 1}}), "<test>")
    algo = build_algorithm(exp)
    assert algo.fewest_updates == 4
    state = {MODEL: {"w": torch.zeros(2)}}
    ups = [Update(cid=c, num_examples=1, payload={"w": torch.ones(2)}) for c in range(3)]
    new, metrics = algo.aggregate(state, ups, None)
    assert metrics == {"kept": [0, 1, 2], "aggregated": 0} and torch.equal(new[MODEL]["w"], torch.zeros(2))
