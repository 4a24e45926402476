"""benchmarks/adaptability.py's ``--predictions`` on an IFCA run: the cluster models and
the assignment come from the last checkpoint (no model load, no run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import adaptability as bench  # noqa: E402


def _checkpoint(run: Path, rnd: int, tensors: dict) -> None:
    d = run / "checkpoints" / f"round-{rnd:06d}"
    d.mkdir(parents=True)
    save_file(tensors, str(d / "algorithm.safetensors"))


def test_cluster_states_take_the_last_checkpoint(tmp_path):
    final = {"w": torch.zeros(2)}
    _checkpoint(tmp_path, 1, {"step.0.cluster_report/assign": torch.tensor([1, 1, 1]), "model.1/w": torch.full((2,), 9.0)})
    _checkpoint(tmp_path, 2, {"step.0.cluster_report/assign": torch.tensor([0, 2, -1]),
                              "model.1/w": torch.ones(2), "model.2/w": torch.full((2,), 2.0)})
    models, assign = bench.cluster_states(tmp_path, final)
    assert assign == [0, 2, -1]  # round 2's, not round 1's
    assert [m["w"].tolist() for m in models] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]  # cluster 0 is final


def test_cluster_states_refuse_a_run_without_an_assignment(tmp_path):
    with pytest.raises(SystemExit, match="algorithm.safetensors"):
        bench.cluster_states(tmp_path, {})
    _checkpoint(tmp_path, 1, {"model.1/w": torch.ones(2)})
    with pytest.raises(SystemExit, match="cluster_report"):
        bench.cluster_states(tmp_path, {})
