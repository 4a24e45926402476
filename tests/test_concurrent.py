"""The processes transport (runtime/concurrent.py) against the sequential one."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.learners.middleware import register_middleware
from fedfm.core.protocols import TRAIN, Envelope, Reply
from fedfm.runtime import concurrent
from fedfm.runtime.client import ClientEnv
from fedfm.runtime.concurrent import ProcessTransport
from fedfm.runtime.local import LocalRuntime
from fedfm.runtime.transport import InProcessTransport

PARENT = os.getpid()


class ExitInWorker:
    """Kills the worker process serving this client in round 1 (never the test process)."""

    def __init__(self, params=None):
        pass

    def before_train(self, examples, ctx):
        if ctx.round == 1 and os.getpid() != PARENT:
            os._exit(3)
        return examples

    def after_train(self, update, ctx):
        return update


class RaiseInRoundOne(ExitInWorker):
    def before_train(self, examples, ctx):
        if ctx.round == 1:
            raise RuntimeError("client refuses round 1")
        return examples


register_middleware("test_exit_in_worker", ExitInWorker)
register_middleware("test_raise_round_one", RaiseInRoundOne)


def _rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # wall times and the process's own peak memory differ by nature
        for k in ("wall_s", "peak_rss_mb"):
            r.pop(k, None)
    return rows


def _store_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


@pytest.mark.parametrize("parent_trains, unpad", [(False, False), (True, True)])
def test_processes_match_sequential_bit_for_bit(tmp_path, monkeypatch, parent_trains, unpad):
    # Client-local parameters (peft.local -> the client store on disk), per-client eval
    # (the evaluate phase reads the store's accepted writes) and 3 clients on 2 workers,
    # or on 1 worker and the parent (runtime.parent_trains), there with train.unpad on
    # both sides (deterministic too: same bits at the same thread count).
    over = {
        "federation.clients": 3,
        "federation.client_holdout": 0.2,
        "eval.clients": "all",
        "peft.local": ["*classifier.*"],
        "runtime.threads": 1,
        "train.unpad": unpad,
    }
    seq = LocalRuntime(from_dict(tiny_config(tmp_path, **over)), tmp_path / "seq")
    assert isinstance(seq.transport, InProcessTransport)
    seq.run()
    here = []
    train_here = ProcessTransport._train_here
    monkeypatch.setattr(ProcessTransport, "_train_here", lambda self, e, *a: here.append(e.cid) or train_here(self, e, *a))
    par = LocalRuntime(from_dict(tiny_config(tmp_path, **over, **{
        "runtime.transport": "processes", "runtime.workers": 1 if parent_trains else 2,
        "runtime.threads_per_worker": 1, "runtime.parent_trains": parent_trains})), tmp_path / "par")
    assert isinstance(par.transport, ProcessTransport)
    par.run()
    assert par.transport.slots == []  # closed after the run
    assert bool(here) == parent_trains  # the parent trained (or evaluated) some clients itself
    assert torch.get_num_threads() == 1 and par.env.on_step is not None  # restored after each
    for k, v in seq.final_state.items():
        assert torch.equal(v, par.final_state[k]), k
    assert _rows(tmp_path / "seq") == _rows(tmp_path / "par")  # updates' loss, bytes, accuracy, client eval
    seq_store, par_store = _store_bytes(tmp_path / "seq" / "clients"), _store_bytes(tmp_path / "par" / "clients")
    assert seq_store and seq_store == par_store  # settled local_state files, byte for byte


def test_workers_get_the_next_client_while_the_parent_trains(monkeypatch):
    # The parent's client steps until the worker has been handed all four other clients
    # and answered them (at most 1,000 steps); the worker answers at once. At each of the
    # parent's steps the worker is collected and given the next client, so the worker
    # serves the four others while the parent trains its one (before: one client each,
    # in turn, so the parent served two, and this loop would run out of steps).
    started: list[int] = []

    def fake_answer(env, envelope):
        if os.getpid() == PARENT:
            for step in range(1000):
                env.on_step(step + 1, 1000)
                if len(started) == 5 and all(s.busy is None for s in tr.slots):
                    break
                time.sleep(0.01)
        return Reply(envelope.cid, data=b"x", info={"pid": os.getpid()})

    monkeypatch.setattr(concurrent, "answer", fake_answer)
    env = ClientEnv(exp=None, wb=None, algo=None, up=None, down=None, store=None)
    tr = ProcessTransport(env, workers=1, threads_per_worker=1, parent_trains=True, on_start=started.append)
    try:
        replies = tr.exchange([Envelope(cid, TRAIN, {}, b"") for cid in range(5)])
    finally:
        tr.close()
    served_here = sorted(c for c, r in replies.items() if r.info["pid"] == PARENT)
    assert sorted(replies) == [0, 1, 2, 3, 4] and served_here == [1]
    assert sorted(started) == [0, 1, 2, 3, 4]
    assert env.on_step is None  # restored after the parent's client


def test_a_message_that_cannot_be_sent_is_a_failed_client(monkeypatch):
    # A lambda in a message cannot be pickled for the pipe: that client fails, naming
    # why, and the worker serves the next one (nothing waits for a reply never asked for).
    monkeypatch.setattr(concurrent, "answer", lambda env, e: Reply(e.cid, data=b"x", info={}))
    tr = ProcessTransport(ClientEnv(exp=None, wb=None, algo=None, up=None, down=None, store=None), workers=1)
    try:
        replies = tr.exchange([Envelope(0, TRAIN, {"f": lambda: 0}, b""), Envelope(1, TRAIN, {}, b"")])
    finally:
        tr.close()
    assert replies[0].error.startswith("could not send to the worker: ") and replies[0].data is None
    assert replies[1].error is None and replies[1].data == b"x"


def test_dead_worker_is_a_failed_client_and_the_pool_recovers(tmp_path):
    raw = tiny_config(tmp_path, **{
        "federation.clients": 3,
        "federation.roles": [{"name": "crasher", "cids": [0], "middleware": [{"name": "test_exit_in_worker"}]}],
        "runtime.transport": "processes", "runtime.workers": 2,
    })
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    summary = rt.run()
    rows = _rows(tmp_path / "run")
    r1, r2 = rows[1], rows[2]
    assert [f["cid"] for f in r1["failed"]] == [0]
    assert "worker process died" in r1["failed"][0]["error"] and "exit code 3" in r1["failed"][0]["error"]
    assert r1["clients"] == [1, 2]
    assert r2["failed"] == [] and r2["clients"] == [0, 1, 2]  # a fresh worker served client 0
    assert rt.transport.restarts == 1
    assert summary["failed"] == 1 and summary["final"]["accuracy"] is not None


def test_client_exception_in_worker_is_a_failed_client(tmp_path):
    raw = tiny_config(tmp_path, **{
        "rounds": 1,
        "federation.roles": [{"name": "refuser", "cids": [1], "middleware": [{"name": "test_raise_round_one"}]}],
        "runtime.transport": "processes", "runtime.workers": 2,
    })
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    rt.run()
    row = _rows(tmp_path / "run")[1]
    assert row["failed"] == [{"cid": 1, "error": "RuntimeError: client refuses round 1"}]
    assert rt.transport.restarts == 0  # the worker lived on


@pytest.mark.parametrize("over, key", [
    ({"runtime.transport": "threads"}, "runtime.transport"),
    ({"runtime.workers": 0}, "runtime.workers"),
    ({"runtime.threads_per_worker": 0}, "runtime.threads_per_worker"),
    ({"runtime.transport": "processes", "runtime.device": "cuda"}, "runtime.transport: processes needs runtime.device: cpu"),
    ({"runtime.transport": "processes", "runtime.backend": "flower"}, "runtime.transport: processes is the local backend's"),
    ({"runtime.parent_trains": True}, "runtime.parent_trains"),
    ({"runtime.workers": 2}, "runtime.workers: 2 needs runtime.transport: processes (got 'sequential')"),
    ({"runtime.transport": "batched", "runtime.threads_per_worker": 2}, "runtime.threads_per_worker: 2 needs runtime"),
])
def test_transport_config_is_checked(tmp_path, over, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        from_dict(tiny_config(tmp_path, **over))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_trim_returns_freed_heap_memory():
    # 3,200 blocks of 64 KiB (below glibc's 128 KiB mmap threshold: they live in the heap)
    # = 200 MiB written, then freed: glibc keeps most of it resident until malloc_trim.
    from fedfm.runtime.concurrent import _malloc_trim, trim

    if _malloc_trim() is None or not os.path.exists("/proc/self/statm"):
        pytest.skip("glibc's malloc_trim and /proc are needed")
    blocks = [bytearray(b"x" * 65536) for _ in range(3200)]
    del blocks[:-1]  # the last one stays on top: the heap cannot simply shrink from its top
    kept = _rss_mb()
    trim()
    assert kept - _rss_mb() > 100  # of the 200 MiB freed, more than half given back
