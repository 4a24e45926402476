"""What the server did with an update is what the client keeps: an update a server step
leaves out is settled as not accepted, the last round's writes are settled at the end of
the run, a garbled client evaluation is left out, and a fresh start never replaces an
earlier run's files without overwrite."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.config import from_dict
from fedfm.core.protocols import Reply
from fedfm.runtime import LocalRuntime
from fedfm.runtime.client_eval import eval_reply_metrics, evaluate_on_clients
from fedfm.runtime.loop import ResumeError
from fedfm.runtime.outputs import read_metrics

from conftest import tiny_config

ROLES = [{"name": "phone", "count": 1, "profile": {"speed": 0.25}}, {"name": "server", "count": 1, "profile": {"speed": 1.0}}]


def test_an_update_a_server_step_leaves_out_is_not_accepted(tmp_path):
    # phone: 3 steps * 0.5 s / 0.25 = 6 s > deadline 4 s: left out every round; server: 1.5 s
    raw = tiny_config(tmp_path, rounds=2, **{
        "federation.roles": ROLES, "train.steps": 3, "peft.local": ["*classifier*"],
        "server_steps": [{"name": "sim_clock", "seconds_per_step": 0.5, "deadline_s": 4.0}]})
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    phone = [c for c, p in rt.loop.algo.profiles.items() if p["role"] == "phone"][0]
    rt.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for row in rows[1:]:
        assert row["sim_clock.late"] == 1 and row["clients"] == [1 - phone]
        assert row["rejected"] == [{"cid": phone, "reason": "left out by the server's update steps"}]
    # the phone's trained head was never aggregated, so it was never kept either
    assert not (tmp_path / "run" / "clients" / str(phone) / "local_state.safetensors").exists()
    assert (tmp_path / "run" / "clients" / str(1 - phone) / "local_state.safetensors").exists()


def test_the_last_rounds_writes_are_settled_at_the_end(tmp_path):
    raw = tiny_config(tmp_path, rounds=2, **{"peft.local": ["*classifier*"], "train.steps": 1})
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    rt.run()
    clients = tmp_path / "run" / "clients"
    assert not any((clients / ".pending").glob("*/*"))  # nothing waits for a next round
    from safetensors.torch import load_file

    for cid in (0, 1):  # each client keeps its round-2 head, the one it trained last
        kept = load_file(clients / str(cid) / "local_state.safetensors")
        assert kept and all(torch.isfinite(t).all() for t in kept.values())


def test_a_garbled_or_non_finite_evaluation_reply_is_left_out():
    good = to_bytes(Payload({}, {"metric.accuracy": "0.75", "metric.loss": "0.5"}))
    assert eval_reply_metrics(good) == ({"accuracy": 0.75, "loss": 0.5}, None)
    assert eval_reply_metrics(b"garbage")[1].startswith("undecodable reply")
    assert eval_reply_metrics(to_bytes(Payload({}, {"metric.accuracy": "nan"})))[1] == "metric.accuracy is nan"
    assert eval_reply_metrics(to_bytes(Payload({}, {"metric.loss": "inf"})))[1] == "metric.loss is inf"
    assert eval_reply_metrics(to_bytes(Payload({}, {"metric.loss": "low"})))[1] == "metric.loss 'low' is not a number"

    class Clients:
        def __init__(self):
            self.clients = [type("C", (), {"cid": c, "eval_indices": [0]})() for c in range(3)]
            self.fingerprint = "f"

    class Transport:
        def exchange(self, envelopes):
            bad = {1: b"garbage", 2: to_bytes(Payload({}, {"metric.accuracy": "nan"}))}
            return {e.cid: Reply(e.cid, bad.get(e.cid, good)) for e in envelopes}

    out = evaluate_on_clients(Transport(), Clients(), "all", 1, {"w": torch.zeros(1)}, [], {})
    assert out["client_evaluated"] == 1 and out["client_accuracy_mean"] == 0.75 and out["client_loss_mean"] == 0.5


def test_a_fresh_start_never_replaces_an_earlier_run_without_overwrite(tmp_path):
    raw = tiny_config(tmp_path, rounds=1, **{"train.steps": 1, "server.checkpoint": False})
    LocalRuntime(from_dict(raw), tmp_path / "run").run()
    before = (tmp_path / "run" / "final.safetensors").read_bytes()
    with pytest.raises(ResumeError, match=r"holds an earlier run's files \(metrics.jsonl, summary.json, final.safetensors\)"):
        LocalRuntime(from_dict(raw), tmp_path / "run").run()
    assert (tmp_path / "run" / "final.safetensors").read_bytes() == before
    summary = LocalRuntime(from_dict(raw), tmp_path / "run", overwrite=True).run()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"] == summary["final"]
