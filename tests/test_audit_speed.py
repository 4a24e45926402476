"""Odd and bad input to the speed levers and the in-process transports (docs/speed.md):
each is refused naming the field, or has a documented behaviour checked here."""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch

from conftest import tiny_config
from fedfm.codecs import CodecChain
from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.config import ConfigError, from_dict
from fedfm.core.protocols import TRAIN, Envelope, Reply
from fedfm.runtime import concurrent
from fedfm.runtime.client import ClientEnv
from fedfm.runtime.concurrent import ProcessTransport, available_cores, gnu_openmp
from fedfm.runtime.receive import receive_update

PARENT = os.getpid()


def _env() -> ClientEnv:
    return ClientEnv(exp=None, wb=None, algo=None, up=None, down=None, store=None)


# -- the processes transport ------------------------------------------------------------


@pytest.mark.skipif(not gnu_openmp(), reason="torch runs on GNU OpenMP (libgomp) here only")
def test_threads_per_worker_above_one_is_refused_under_gnu_openmp(tmp_path):
    # A worker forked after the parent computed on 2 threads hung forever in its first
    # 2-thread matmul (libgomp's pool threads do not exist in the child): the round never ended.
    raw = tiny_config(tmp_path, **{"runtime.transport": "processes", "runtime.threads_per_worker": 2})
    with pytest.raises(ConfigError, match=re.escape("runtime.threads_per_worker: 2: this torch uses GNU OpenMP")):
        from_dict(raw)
    with pytest.raises(ValueError, match="runtime.threads_per_worker: 3"):
        ProcessTransport(_env(), workers=1, threads_per_worker=3)


def _fake_answer(env, envelope):
    return Reply(envelope.cid, data=b"x", info={"pid": float(os.getpid())})


def test_workers_are_forked_for_the_waiting_clients_only(monkeypatch):
    # runtime.workers: 8 with 3 clients forked 8 processes (100 workers: 100 forks, 2.5x the
    # sequential run's wall time on the tiny job); now 3, then 2 more for 5 clients.
    monkeypatch.setattr(concurrent, "answer", _fake_answer)
    tr = ProcessTransport(_env(), workers=8)
    try:
        replies = tr.exchange([Envelope(cid, TRAIN, {}, b"") for cid in range(3)])
        assert sorted(replies) == [0, 1, 2] and len(tr.slots) == 3
        replies = tr.exchange([Envelope(cid, TRAIN, {}, b"") for cid in range(5)])
        assert sorted(replies) == [0, 1, 2, 3, 4] and len(tr.slots) == 5
        tr.exchange([Envelope(0, TRAIN, {}, b"")])
        assert len(tr.slots) == 5  # workers already forked stay
    finally:
        tr.close()


def test_parent_trains_forks_one_worker_fewer_than_the_waiting_clients(monkeypatch):
    monkeypatch.setattr(concurrent, "answer", _fake_answer)
    tr = ProcessTransport(_env(), workers=8, parent_trains=True)
    try:
        replies = tr.exchange([Envelope(cid, TRAIN, {}, b"") for cid in range(3)])
        assert sorted(replies) == [0, 1, 2] and len(tr.slots) == 2
        assert sum(r.info["pid"] == PARENT for r in replies.values()) >= 1
        tr.exchange([Envelope(0, TRAIN, {}, b"")])
        assert len(tr.slots) == 2  # one client: the parent trains it
    finally:
        tr.close()


def test_more_worker_threads_than_cores_warns(caplog):
    cores = available_cores()
    with caplog.at_level(logging.WARNING, logger="fedfm.runtime"):
        tr = ProcessTransport(_env(), workers=cores + 1)
    assert f"runtime.workers {cores + 1} x runtime.threads_per_worker 1 = {cores + 1} threads on {cores} CPU cores" in caplog.text
    assert tr.slots == []  # nothing forked before the first round
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedfm.runtime"):
        ProcessTransport(_env(), workers=cores)
    assert caplog.text == ""


# -- what crosses the wire ----------------------------------------------------------------


def _reply_bytes(**meta) -> bytes:
    base = {"cid": "0", "num_examples": "3", "fingerprint": "f"}
    return to_bytes(Payload({"w": torch.tensor([1.0, 2.0])}, {**base, **meta}))


@pytest.mark.parametrize("raw, reason", [
    ("abc", "metric.train_loss 'abc' is not a number"),
    ("nan", "metric.train_loss is nan"),
    ("-inf", "metric.train_loss is -inf"),
])
def test_a_garbled_metric_rejects_the_update_instead_of_stopping_the_round(raw, reason):
    # Before: float('abc') raised ValueError out of receive_update, ending the run.
    update, why = receive_update(CodecChain([]), _reply_bytes(**{"metric.train_loss": raw}), 1, 0,
                                 {"w": torch.zeros(2)}, 0, None, "f")
    assert update is None and why == reason


def test_readable_metrics_are_kept():
    update, why = receive_update(CodecChain([]), _reply_bytes(**{"metric.train_loss": "0.5", "metric.steps": "2.0"}), 1, 0,
                                 {"w": torch.zeros(2)}, 0, None, "f")
    assert why is None and update.metrics == {"train_loss": 0.5, "steps": 2.0} and update.num_examples == 3


# -- training switches (learners/speed.py) --------------------------------------------------


@pytest.mark.parametrize("switch", ["autocast", "bucket_by_length", "compile", "unpad"])
def test_splitfed_refuses_the_training_switches(tmp_path, switch):
    # splitfed trains with its own loop: the switches were accepted and silently not applied.
    raw = tiny_config(tmp_path, **{"learner.name": "splitfed", "exchanges": [{"name": "splitfed", "steps": 1}],
                                   f"train.{switch}": "bf16" if switch == "autocast" else True})
    with pytest.raises(ConfigError, match=re.escape(f"train.{switch}: learner 'splitfed' trains with its own loop")):
        from_dict(raw)


def test_every_builtin_learner_is_known_to_honour_the_switches_or_not():
    # A new learner must be put in HONOURED (it trains with train_loop) or NOT_HONOURED
    # (refused at config time with a switch on), so no switch is silently ignored.
    from fedfm.learners import learners
    from fedfm.learners.speed import HONOURED, NOT_HONOURED

    assert not set(HONOURED) & set(NOT_HONOURED)
    assert sorted(set(learners.names()) - set(HONOURED) - set(NOT_HONOURED)) == []


# -- the batched transport -----------------------------------------------------------------


def test_batched_transport_refuses_an_unknown_kernel_at_construction():
    # Before: accepted, then every chunk of every round failed in bind() (all clients failed).
    from fedfm.runtime.batched import BatchedTransport

    with pytest.raises(ValueError, match=re.escape("runtime.batch_kernel must be one of ['auto', 'segments', 'stacked'], got 'bmm'")):
        BatchedTransport(_env(), batch_clients=2, kernel="bmm")


# -- resuming with another transport -----------------------------------------------------


def _final(rt) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in rt.final_state.items()}


def test_resume_with_the_processes_transport_is_bit_identical(tmp_path):
    # runtime.* may change on --resume. The processes transport at threads_per_worker equal
    # to runtime.threads trains each client with the same bits, so a run resumed on it ends
    # as the uninterrupted sequential run does (docs/speed.md, "Resuming with other levers").
    from fedfm.runtime.local import LocalRuntime

    over = {"rounds": 2, "train.steps": 2, "runtime.threads": 1}
    whole = LocalRuntime(from_dict(tiny_config(tmp_path, **over)), tmp_path / "whole")
    whole.run()
    LocalRuntime(from_dict(tiny_config(tmp_path, **{**over, "rounds": 1})), tmp_path / "part").run()
    resumed = LocalRuntime(from_dict(tiny_config(tmp_path, **{**over, "runtime.transport": "processes", "runtime.workers": 2})),
                           tmp_path / "part", resume=True)
    resumed.run()
    a, b = _final(whole), _final(resumed)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_process_that_used_cuda_does_not_fork_workers(monkeypatch):
    # on an H200, workers forked after a CUDA run in the same process failed every client in
    # autograd ("Unable to handle autograd's threading in combination with fork-based
    # multiprocessing"); the transport now refuses to start there, naming the cause
    from fedfm.runtime import concurrent

    monkeypatch.setattr(concurrent, "cuda_used", lambda: True)
    with pytest.raises(RuntimeError, match=r"runtime.transport: processes: this process has already used CUDA"):
        ProcessTransport(_env(), workers=1)
    monkeypatch.setattr(concurrent, "cuda_used", lambda: False)
    ProcessTransport(_env(), workers=1)  # a fresh process: no worker forked until a round needs one
