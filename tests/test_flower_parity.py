"""The Flower backend runs the same experiment as the local backend.

The local learner is deterministic given (State, examples, seed) and the server
aggregates in the order the clients were sampled, so with the same thread count the
Flower simulation's final State is bit-identical to the local backend's: the test
asserts exact equality, not a tolerance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from fedfm.config import ConfigError, from_dict  # noqa: E402
from fedfm.runtime import LocalRuntime  # noqa: E402
from parity import assert_same_rows, check_job_exercised, comparable, parity_config  # noqa: E402
from fedfm.runtime.flower.payload import (  # noqa: E402
    bytes_to_record,
    config_hash,
    experiment_from_text,
    experiment_text,
    record_to_bytes,
)


def test_payload_bytes_cross_flower_unchanged():
    data = bytes(range(256)) * 3 + b"\x00tail"
    rec = bytes_to_record(data)
    assert record_to_bytes(rec, "client 0") == data
    assert rec["bytes"].numpy().shape == (len(data),)  # one flat uint8 array, len() = 773 bytes


def test_payload_rejects_a_record_without_bytes():
    from flwr.app import Array, ArrayRecord

    with pytest.raises(ValueError, match="client 3"):
        record_to_bytes(ArrayRecord({"other": Array(np.zeros(2, np.float32))}), "client 3")
    with pytest.raises(ValueError, match="flat uint8"):
        record_to_bytes(ArrayRecord({"bytes": Array(np.zeros(2, np.float32))}), "client 3")


def test_experiment_text_round_trips_and_hashes_stably(tiny):
    exp = from_dict(tiny)
    text = experiment_text(exp)
    again = experiment_from_text(text)
    assert again.dump() == exp.dump()
    assert config_hash(text) == config_hash(experiment_text(again))
    with pytest.raises(ConfigError, match="empty"):
        experiment_from_text("")


def test_runtime_flower_config_is_validated(tiny):
    tiny["runtime"] = {"backend": "flower", "flower": {"mode": "cluster"}}
    with pytest.raises(ConfigError, match="runtime.flower.mode"):
        from_dict(tiny)
    tiny["runtime"] = {"backend": "flower", "flower": {"num_cpus": 0}}
    with pytest.raises(ConfigError, match="runtime.flower.num_cpus"):
        from_dict(tiny)


def test_client_session_is_cached_per_config(tmp_path, tiny):
    from fedfm.runtime.flower.session import _SESSIONS, open_session

    exp = from_dict(tiny)
    key = config_hash(experiment_text(exp))
    first = open_session(exp, key, 0, None, tmp_path / "store")
    assert open_session(exp, key, 1, None, tmp_path / "store") is first  # one model, every client
    assert open_session(exp, "other", 0, None, tmp_path / "store") is not first
    assert list(_SESSIONS) == [("other", "")]  # another run's model was dropped
    with pytest.raises(ValueError, match="client id 5"):
        open_session(exp, key, 5, None, tmp_path / "store")
    _SESSIONS.clear()


def test_exported_partition_gives_the_client_the_same_examples(tmp_path, tiny):
    from fedfm.runtime.flower.deployment import export_partitions
    from fedfm.runtime.flower.session import owner_federation
    from fedfm.runtime.workbench import Workbench

    exp = from_dict(tiny)
    paths = export_partitions(exp, tmp_path / "parts")
    assert [p.name for p in paths] == ["client_0.parquet", "client_1.parquet"]
    full = Workbench(exp)
    own = Workbench(exp, owner_federation(exp, 1, str(paths[1])))
    assert [e["input_ids"] for e in own.examples(1)] == [e["input_ids"] for e in full.examples(1)]
    assert [e["label"] for e in own.examples(1)] == [e["label"] for e in full.examples(1)]
    assert own.examples(0) == []


def test_export_partitions_replaces_client_files_only_when_told(tmp_path, tiny):
    from fedfm.runtime.flower.deployment import export_partitions

    exp = from_dict(tiny)
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "client_1.parquet").write_bytes(b"an owner's own file")
    with pytest.raises(ValueError, match=r"already holds client_1.parquet; pass --overwrite"):
        export_partitions(exp, parts)
    assert sorted(p.name for p in parts.iterdir()) == ["client_1.parquet"]  # nothing written
    assert (parts / "client_1.parquet").read_bytes() == b"an owner's own file"
    assert [p.name for p in export_partitions(exp, parts, overwrite=True)] == ["client_0.parquet", "client_1.parquet"]
    with pytest.raises(ValueError, match=r"--out .*client_0.parquet is a file, not a folder"):
        export_partitions(exp, parts / "client_0.parquet")


def test_simulation_matches_local_on_every_metrics_field(tmp_path):
    """SCAFFOLD, top-k + EF + int8 up, delta down, 25% dropout and a rejected client:
    every metrics.jsonl field but wall times, and the final State, are identical."""
    from fedfm.runtime.flower.simulation import run_flower_simulation

    raw = parity_config(tmp_path, backend="flower", flower={"num_cpus": 2})
    exp = from_dict(raw)
    summary = run_flower_simulation(exp, tmp_path / "flower")
    local = LocalRuntime(from_dict(parity_config(tmp_path)), tmp_path / "local")
    local.run()
    a = load_file(str(tmp_path / "flower" / "final.safetensors"))
    b = load_file(str(tmp_path / "local" / "final.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fl, lo = comparable(tmp_path / "flower" / "metrics.jsonl"), comparable(tmp_path / "local" / "metrics.jsonl")
    check_job_exercised(lo)
    assert_same_rows(fl, lo)
    assert summary["backend"] == "flower-simulation"
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in lo) > 0
