"""Checkpoint / resume: a run SIGKILLed mid-round and resumed ends bit-identical to an
uninterrupted one; the transactional client store and the checkpoint files on their own."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedfm.config import from_dict
from fedfm.runtime import LocalRuntime
from fedfm.runtime.checkpoint import Checkpointer
from fedfm.runtime.outputs import read_metrics
from fedfm.runtime.store import ClientStore

HERE = Path(__file__).parent
SRC = HERE.parent / "src"


def resume_config(tmp_path) -> dict:
    from conftest import tiny_config

    return tiny_config(
        tmp_path,
        rounds=3,
        **{
            "federation.clients": 3,
            "federation.clients_per_round": 2,
            "faults.dropout": 0.3,
            "learner.name": "counting",
            "train.epochs": 1,
            "runtime.threads": 1,
        },
    )


def worker(cfg: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{HERE}", **(env or {})}
    return subprocess.Popen([sys.executable, str(HERE / "resume_worker.py"), str(cfg), str(out), *extra], env=e)


def test_sigkill_mid_round_then_resume_is_bit_identical(tmp_path):
    import resume_worker  # noqa: F401  (registers the counting learner here too)

    raw = resume_config(tmp_path)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(raw))
    out = tmp_path / "killed"
    out.mkdir()
    proc = worker(cfg, out, env={"FEDFM_PAUSE_ROUND": "2", "FEDFM_PAUSE_DIR": str(out)})
    deadline = time.time() + 600
    while not (out / "paused").exists():
        assert proc.poll() is None, "the worker ended before reaching round 2"
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the worker did not reach round 2 within 600 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Killed mid-round 2: round 1 checkpointed, round 2's store write only staged.
    assert [r["round"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
    assert Checkpointer(out).rounds() == [1]
    assert any(p.name == "r2a0" for p in (out / "clients" / ".pending").glob("*/*"))
    assert not (out / "final.safetensors").exists()

    assert worker(cfg, out, "--resume").wait(timeout=600) == 0

    threads = torch.get_num_threads()
    try:
        rt = LocalRuntime(from_dict(raw), tmp_path / "straight")
        rt.run()
    finally:
        torch.set_num_threads(threads)
    resumed = load_file(str(out / "final.safetensors"))
    assert set(resumed) == set(rt.final_state)
    for name, t in rt.final_state.items():
        assert torch.equal(resumed[name], t), name
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    for a, b in zip(rows, straight):
        assert (a["clients"], a.get("dropped"), a.get("loss")) == (b["clients"], b.get("dropped"), b.get("loss"))
    for cid in range(3):
        a = ClientStore(out / "clients").get(cid, "count")
        b = ClientStore(tmp_path / "straight" / "clients").get(cid, "count")
        assert (a is None and b is None) or torch.equal(a["n"], b["n"])
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 1


def test_resume_refuses_a_changed_config(tmp_path):
    raw = resume_config(tmp_path)
    raw["learner"] = {"name": "local"}
    raw["rounds"] = 1
    raw["train"]["steps"] = 1
    threads = torch.get_num_threads()
    try:
        first = LocalRuntime(from_dict(raw), tmp_path / "run")
        first.run()
        raw["train"]["lr"] = 0.5
        raw["rounds"] = 2
        with pytest.raises(ValueError, match=r"differs from the checkpointed run: train.lr: was [0-9.e-]+, now 0.5 "):
            LocalRuntime(from_dict(raw), tmp_path / "run", workbench=first.wb, resume=True).run()
    finally:
        torch.set_num_threads(threads)


def test_client_store_stages_per_client_and_settles_on_the_servers_decision(tmp_path):
    store = ClientStore(tmp_path)
    one = {"x": torch.tensor([1.0])}
    two = {"x": torch.tensor([2.0])}
    store.put(0, "a", one)  # nothing staged: written straight through
    store.stage(0, "r1a0")
    store.stage(1, "r1a0")
    store.put(0, "a", two)
    store.put(1, "b", two)
    store.delete(0, "a")
    assert store.get(0, "a") is None and store.keys(0) == []  # read-your-writes
    store.put(0, "a", two)
    assert torch.equal(ClientStore(tmp_path).get(0, "a")["x"], one["x"])  # not yet settled
    # Client 1's update was rejected: its write is dropped on its next message.
    store.settle(1, "r1a0", False)
    assert store.get(1, "b") is None and store.pending_tags(1) == []
    # Client 0's was accepted: settled when the decision arrives, in any process.
    again = ClientStore(tmp_path)
    again.settle(0, "r1a0", True)
    assert torch.equal(again.get(0, "a")["x"], two["x"]) and again.pending_tags(0) == []
    # A round redone after a resume: the stale tag is dropped, the decided one kept.
    store.stage(0, "r2a0")
    store.put(0, "a", one)
    store.stage(0, "r3a0")
    store.put(0, "a", {"x": torch.tensor([3.0])})
    store.settle(0, "r2a0", True)
    assert torch.equal(store.get(0, "a")["x"], one["x"]) and store.pending_tags(0) == []
    # The server's mirror on resume: settle the checkpoint's decisions, drop everything else.
    store.stage(2, "r4a0")
    store.put(2, "c", one)
    store.stage(0, "r4a0")
    store.put(0, "a", two)
    ClientStore(tmp_path).settle_all({2: ("r4a0", True)})
    fresh = ClientStore(tmp_path)
    assert torch.equal(fresh.get(2, "c")["x"], one["x"]) and torch.equal(fresh.get(0, "a")["x"], one["x"])
    assert not (tmp_path / ".pending").exists()


def test_checkpoint_round_trip_restores_rng_and_ignores_partial(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    state = {"w": torch.arange(6.0).reshape(2, 3)}  # (2, 3)
    for rnd in (1, 2, 3):
        random.seed(rnd)
        np.random.seed(rnd)
        torch.manual_seed(rnd)
        ck.save(rnd, {"w": state["w"] * rnd}, {"m": torch.ones(2) * rnd}, {"note": rnd})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    (tmp_path / "checkpoints" / "round-000004.tmp").mkdir()  # a save cut short
    assert ck.rounds() == [2, 3]  # keep=2 pruned round 1
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    loaded = ck.load_latest()
    assert loaded.round == 3 and loaded.info["note"] == 3
    assert torch.equal(loaded.state["w"], state["w"] * 3) and torch.equal(loaded.algorithm["m"], torch.full((2,), 3.0))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_resume_with_another_thread_count_warns_it_is_not_bit_identical(tmp_path):
    from conftest import tiny_config

    raw = tiny_config(tmp_path, rounds=1, **{"train.steps": 1, "runtime.threads": 1})
    threads = torch.get_num_threads()
    try:
        LocalRuntime(from_dict(raw), tmp_path / "run").run()
        raw["rounds"], raw["runtime"]["threads"] = 2, 2
        summary = LocalRuntime(from_dict(raw), tmp_path / "run", resume=True).run()
    finally:
        torch.set_num_threads(threads)
    assert summary["resumed_from"] == 1
    assert len(summary["warnings"]) == 1 and "checkpointed with 1 torch threads and continues with 2" in summary["warnings"][0]
    assert "not be bit-identical" in summary["warnings"][0]
