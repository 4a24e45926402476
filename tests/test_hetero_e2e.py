"""Heterogeneous learners end to end on the tiny model: per-tier shapes on the wire, the
simulated clock in metrics.jsonl, and the config-time refusals."""

from __future__ import annotations

import json

import pytest

from fedfm.config import ConfigError, from_dict
from fedfm.runtime import LocalRuntime

from conftest import tiny_config

TIERS = [
    {"name": "phone", "count": 1, "profile": {"rank": 2, "layers": 1, "cut": 1, "speed": 0.25, "bandwidth_mbps": 5}},
    {"name": "laptop", "count": 1, "profile": {"rank": 4, "layers": 1, "cut": 1, "speed": 0.5, "bandwidth_mbps": 20}},
    {"name": "server", "count": 1, "profile": {"rank": 8, "layers": 2, "cut": 2, "speed": 1.0, "bandwidth_mbps": 100}},
]


def hetero_raw(tmp_path, learner: dict, **over):
    return tiny_config(
        tmp_path,
        **{
            "rounds": 1,
            "federation.clients": 3,
            "federation.roles": TIERS,
            "peft.r": 8,
            "train.steps": 2,
            "federation.test_examples": 20,
            "learner": learner,
            "server_steps": [{"name": "sim_clock", "seconds_per_step": 0.5}],
            **over,
        },
    )


@pytest.mark.parametrize("learner", [{"name": "hetlora", "prune": True}, {"name": "flexlora"}, {"name": "fedra"}, {"name": "split"}])
def test_one_round_per_learner(tmp_path, learner):
    out = tmp_path / "out"
    LocalRuntime(from_dict(hetero_raw(tmp_path, learner)), out).run()
    row = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert row["rejected"] == [] and row["failed"] == [] and sorted(row["clients"]) == [0, 1, 2]
    assert row["sim_clock.sim_time_s"] > 0 and row["sim_clock.late"] == 0
    up = {t["name"]: row[f"sim_clock.bytes_up.{t['name']}"] for t in TIERS}
    if learner["name"] in ("hetlora", "flexlora"):
        # LoRA on query+value of 2 layers, hidden 32: 4 modules * 2 factors * 32 * r floats, plus the head
        head = up["server"] - 4 * 2 * 32 * 8 * 4
        assert up["phone"] - head == 4 * 2 * 32 * 2 * 4 and up["laptop"] - head == 4 * 2 * 32 * 4 * 4
    if learner["name"] == "fedra":
        assert up["phone"] == up["laptop"] < up["server"]  # 1 layer of 2 vs both
    assert row["bytes_up"] > 0 and "accuracy" in row


def test_refused_at_config_time(tmp_path):
    with pytest.raises(ConfigError, match=r"server_optimizer must be sgd with lr 1.0 \(got fedadam"):
        from_dict(hetero_raw(tmp_path, {"name": "flexlora"}, server_optimizer={"name": "fedadam"}))
    tiers = [dict(TIERS[0], profile={"rank": 16})]
    with pytest.raises(ConfigError, match=r"profile.rank 16 must be an integer in 1..peft.r \(8\)"):
        from_dict(hetero_raw(tmp_path, {"name": "hetlora"}, **{"federation.roles": tiers}))
    with pytest.raises(ConfigError, match=r"needs peft.method lora, not bitfit"):
        from_dict(hetero_raw(tmp_path, {"name": "hetlora"}, peft={"method": "bitfit"}))
