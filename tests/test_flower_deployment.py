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


# What both backends record; the local backend's fault fields (sampled, dropped, ...)
# and per-stage codec bytes have no Flower counterpart.
COMPARED = ("round", "accuracy", "loss", "perplexity", "train_loss", "bytes_up", "bytes_down", "clients")


def rows(path):
    return [{k: r[k] for k in COMPARED if k in r} for r in map(json.loads, path.read_text().splitlines())]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_two_supernodes_over_tls_run_two_rounds(tmp_path, tiny):
    tiny["runtime"] = {
        "progress": False,
        "threads": 1,
        "backend": "flower",
        "flower": {"mode": "deployment", "wait_for_nodes_s": 240, "round_timeout_s": 600},
    }
    exp = from_dict(tiny)
    parts = export_partitions(exp, tmp_path / "parts")
    lb = Loopback(tmp_path / "loopback", parts)
    pids: list[int] = []
    try:
        lb.start()
        pids = list(lb.pids)
        assert len(pids) == 3
        conf = (lb.flwr_home / "config.toml").read_text()
        assert "root-certificates" in conf and "insecure" not in conf
        done = submit(exp, tmp_path / "run", lb.name, env=lb.env, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        lb.stop()
    assert pids and all(gone(p) for p in pids)
    assert "insecure" not in (tmp_path / "loopback" / "superlink.log").read_text().lower()

    got = rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in got] == [0, 1, 2]
    assert [r["clients"] for r in got] == [[], [0, 1], [0, 1]]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in got[1:])
    LocalRuntime(exp, tmp_path / "local").run()
    assert got == rows(tmp_path / "local" / "metrics.jsonl")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["backend"] == "flower-deployment" and summary["rejected"] == []
