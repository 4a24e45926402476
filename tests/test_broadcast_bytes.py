"""What the server broadcasts beside the State (SCAFFOLD's c) is counted on the downlink."""

from __future__ import annotations

import json

from fedfm.config import from_dict
from fedfm.runtime import LocalRuntime


def _down_per_client(tmp_path, tiny, learner):
    tiny["learner"] = learner
    rt = LocalRuntime(from_dict(tiny, overrides=["rounds=1", "train.steps=1"]), tmp_path / learner["name"])
    rt.run()
    row = json.loads((tmp_path / learner["name"] / "metrics.jsonl").read_text().splitlines()[1])
    n_params = sum(t.numel() for t in rt.wb.initial_state().values())
    return row["bytes_down"] // len(row["clients"]), n_params


def test_scaffold_control_variate_is_counted_downstream(tmp_path, tiny):
    plain, n = _down_per_client(tmp_path, tiny, {"name": "local"})
    scaffold, _ = _down_per_client(tmp_path, tiny, {"name": "scaffold"})
    # FedAvg sends the State (n float32 values); SCAFFOLD sends the State and c (2n values).
    assert n * 4 < plain < n * 4 + 8192
    assert 2 * n * 4 < scaffold < 2 * n * 4 + 16384
