"""SplitFed on Flower's simulation runtime: the same split rounds as the local backend
(the phases run identically on every transport). Ray start-up makes this file take about
1.5 minutes on two shared cores."""

from __future__ import annotations

import pytest
import torch

from fedfm.config import from_dict
from fedfm.runtime import LocalRuntime
from test_hetero_splitfed import splitfed_config


def test_flower_simulation_runs_the_same_split_rounds(tmp_path):
    """The same SplitFed job on Flower's simulation runtime: every metrics.jsonl field but
    wall times (phase bytes included) and the final State are identical to the local run."""
    pytest.importorskip("flwr")
    from fedfm.runtime.flower.simulation import run_flower_simulation
    from parity import assert_same_rows, comparable

    roles = [{"name": "a", "count": 1, "profile": {"cut": 1}}, {"name": "b", "count": 1, "profile": {"cut": 2}}]
    def config(**runtime):
        raw = splitfed_config(tmp_path, 2, roles, rounds=1)
        raw["runtime"] = {"progress": False, "threads": 1, **runtime}
        return from_dict(raw)
    run_flower_simulation(config(backend="flower", flower={"num_cpus": 1}), tmp_path / "flower")
    LocalRuntime(config(), tmp_path / "local").run()
    fl, lo = comparable(tmp_path / "flower" / "metrics.jsonl"), comparable(tmp_path / "local" / "metrics.jsonl")
    assert [r["round"] for r in lo] == [0, 1] and all(r["clients"] == [0, 1] for r in lo[1:])
    assert set(lo[1]["phase_bytes"]) == {"splitfed.1", "splitfed.2", "splitfed.3"}
    assert_same_rows(fl, lo)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "flower" / "final.safetensors")), load_file(str(tmp_path / "local" / "final.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
