"""A Flower-simulation run killed mid-round and resumed ends bit-identical to an
uninterrupted one: the round loop's checkpoints and the clients' staged store writes
(error-feedback residuals, SCAFFOLD's c_i, what each client last received) behave on
Flower exactly as on the local backend.

The job is the parity job (tests/parity.py) with client 2 made slow in round 2 (the
``delay`` middleware: 20 wall seconds before training), so the kill lands while round 2
is in flight: after client 2 staged its round-2 writes and before the round's checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("flwr")

from fedfm.config import from_dict  # noqa: E402
from fedfm.runtime import LocalRuntime  # noqa: E402
from fedfm.runtime.checkpoint import Checkpointer  # noqa: E402
from parity import comparable, parity_config  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def slow_job(tmp_path, **runtime) -> dict:
    raw = parity_config(tmp_path, **runtime)
    raw["federation"]["roles"].append({"name": "slow", "cids": [2], "middleware": [{"name": "delay", "seconds": 20, "rounds": [2]}]})
    return raw


def fedfm(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "fedfm", "run", str(cfg), "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill_all(proc: subprocess.Popen) -> None:
    family = psutil.Process(proc.pid).children(recursive=True)
    for p in family + [psutil.Process(proc.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(family, timeout=30)


def kill_once_staged(proc: subprocess.Popen, out: Path, pattern: str) -> None:
    """SIGKILL the run (and its children) once a client staged a store write matching
    ``pattern`` under ``out/clients/.pending`` (e.g. ``2/r2a0``: client 2, round 2)."""
    pending = out / "clients" / ".pending"
    deadline = time.time() + 600
    while not any(pending.glob(pattern)):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before round 2 was in flight:\n{proc.stdout.read().decode()[-3000:]}")
        if time.time() > deadline:
            kill_all(proc)
            pytest.fail("round 2 was not in flight within 600 s")
        time.sleep(0.05)
    kill_all(proc)


def test_flower_simulation_killed_mid_round_resumes_bit_identically(tmp_path):
    raw = slow_job(tmp_path, backend="flower", flower={"num_cpus": 2})
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "flower"
    proc = fedfm(cfg, out)
    kill_once_staged(proc, out, "2/r2a0")
    assert Checkpointer(out).rounds() == [1], "the kill did not land inside round 2"
    assert not (out / "final.safetensors").exists()

    resumed = fedfm(cfg, out, "--resume")
    log = resumed.communicate(timeout=900)[0].decode()
    assert resumed.returncode == 0, log[-3000:]

    LocalRuntime(from_dict(slow_job(tmp_path)), tmp_path / "straight").run()
    a, b = load_file(str(out / "final.safetensors")), load_file(str(tmp_path / "straight" / "final.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert comparable(out / "metrics.jsonl") == comparable(tmp_path / "straight" / "metrics.jsonl")
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 1
