"""End-to-end: 2 clients x 2 rounds on a tiny random BERT; the loss goes down."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from fedfm.config import from_dict
from fedfm.runtime import LocalRuntime


def test_tiny_federated_run_lowers_loss(tmp_path, tiny):
    exp = from_dict(tiny)
    rt = LocalRuntime(exp, tmp_path / "run")
    summary = rt.run()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("round", "accuracy", "loss", "bytes_up", "bytes_down", "clients", "wall_s"):
        assert key in rows[1]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[1]["clients"] == [0, 1]
    final = load_file(str(tmp_path / "run" / "final.safetensors"))
    assert set(final) == set(rt.final_state)
    assert summary["peak_rss_mb"] > 0
    assert (tmp_path / "run" / "config.yaml").exists()
