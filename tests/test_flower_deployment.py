"""A real Flower deployment on loopback: one SuperLink, two SuperNodes, TLS.

The test makes its own CA and server certificate, starts ``flower-superlink`` and one
``flower-supernode`` per client on free ports of 127.0.0.1 (each SuperNode's node config
names its client id and its own data file), submits 2 rounds of the tiny experiment with
``flwr run`` on the shipped app, and stops every process by PID at the end, also on
failure. The metrics must equal the local backend's (same data, same seeds).
"""

from __future__ import annotations

import json

import psutil
import pytest

pytest.importorskip("flwr")

from fedfm.config import from_dict  # noqa: E402
from fedfm.runtime import LocalRuntime  # noqa: E402
from fedfm.runtime.flower.deployment import export_partitions, submit  # noqa: E402
from fedfm.runtime.flower.loopback import Loopback  # noqa: E402
from parity import assert_same_rows, check_job_exercised, comparable, parity_config  # noqa: E402


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_four_supernodes_over_tls_match_local_on_every_metrics_field(tmp_path):
    """The parity job (tests/parity.py) on a real deployment: one SuperLink, four
    SuperNodes with their own data files and client stores, TLS. Every metrics.jsonl
    field but wall times equals the local backend's."""
    raw = parity_config(tmp_path, backend="flower", flower={"mode": "deployment", "wait_for_nodes_s": 240, "round_timeout_s": 600})
    exp = from_dict(raw)
    parts = export_partitions(exp, tmp_path / "parts")
    lb = Loopback(tmp_path / "loopback", parts)
    pids: list[int] = []
    try:
        lb.start()
        pids = list(lb.pids)
        assert len(pids) == 5
        conf = (lb.flwr_home / "config.toml").read_text()
        assert "root-certificates" in conf and "insecure" not in conf
        done = submit(exp, tmp_path / "run", lb.name, env=lb.env, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        lb.stop()
    assert pids and all(gone(p) for p in pids)
    assert "insecure" not in (tmp_path / "loopback" / "superlink.log").read_text().lower()

    got = comparable(tmp_path / "run" / "metrics.jsonl")
    LocalRuntime(from_dict(parity_config(tmp_path)), tmp_path / "local").run()
    local = comparable(tmp_path / "local" / "metrics.jsonl")
    check_job_exercised(local)
    assert_same_rows(got, local)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["backend"] == "flower-deployment" and summary["rejected"] == len([e for r in local[1:] for e in r["rejected"]])


def test_submit_names_its_superlink_or_refuses(tmp_path, tiny):
    exp = from_dict(tiny)
    assert exp.runtime.flower.superlink is None
    with pytest.raises(ValueError, match="no SuperLink named: pass --superlink NAME or set runtime.flower.superlink"):
        submit(exp, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written, no flwr started
