"""Rounds with several exchange phases (core.protocols.ExchangePhase): a phase before
training whose replies decide who trains and what each client's instruction says, a phase
after training that may change the accepted updates; every phase's bytes are counted."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.config import from_dict
from fedfm.core.exchanges import build_phases, exchanges, register_exchange
from fedfm.core.protocols import ExchangePhaseBase
from fedfm.core.registry import RegistryError
from fedfm.runtime import LocalRuntime

from conftest import tiny_config


class Challenge:
    """Before training: the server sends each client a number; it answers number + cid.
    Client 1 answers wrongly and is left out of training. Every member declared by hand."""

    name, when = "challenge", "before_train"
    on_train_reply = metrics = None

    def messages(self, rnd, participants, round_state):
        return {cid: ({"n": str(10 * rnd + cid)}, {"x": torch.tensor([float(cid)])}) for cid in participants}

    def client(self, env, cid, rnd, meta, tensors):
        env.store.put(cid, "challenge", {"seen": torch.tensor([float(rnd)])})  # staged like any write
        answer = int(meta["n"]) + cid + (1 if cid == 1 else 0)
        return {"answer": str(answer)}, {"y": tensors["x"] * 2}

    def receive(self, rnd, replies, round_state):
        ok = [cid for cid, (meta, t) in replies.items() if int(meta["answer"]) == 10 * rnd + 2 * cid and float(t["y"]) == 2 * cid]
        for cid in ok:
            round_state["instructions"][cid] = {"challenge": 10 * rnd + cid}
        return ok

    def transform(self, updates, round_state):
        return updates


class Tally(ExchangePhaseBase):
    """After training: each trained client confirms; the updates go on unchanged (the hooks:
    ExchangePhaseBase's None)."""

    name, when = "tally", "after_train"

    def messages(self, rnd, participants, round_state):
        return {cid: ({}, {}) for cid in participants}

    def client(self, env, cid, rnd, meta, tensors):
        return {"ok": "1"}, {}

    def receive(self, rnd, replies, round_state):
        round_state["tallied"] = sorted(replies)
        return sorted(replies)

    def transform(self, updates, round_state):
        assert [u.cid for u in updates] == round_state["tallied"]
        return updates


def test_phases_decide_participants_and_count_their_bytes(tmp_path):
    if "challenge_tally" not in exchanges.names():
        register_exchange("challenge_tally", lambda params: [Challenge(), Tally()])
    raw = tiny_config(tmp_path, rounds=1, **{"federation.clients": 3})
    raw["exchanges"] = [{"name": "challenge_tally"}]
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    rt.run()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert row["clients"] == [0, 2]
    assert row["failed"] == [{"cid": 1, "error": "refused by the server in phase challenge", "phase": "challenge"}]
    assert row["rejected"] == []
    # Each challenge message is one safetensors payload: {"x": (1,)} with meta {"n": ...}.
    down = sum(len(to_bytes(Payload({"x": torch.tensor([float(c)])}, {"n": str(10 + c)}))) for c in range(3))
    up = sum(len(to_bytes(Payload({"y": torch.tensor([2.0 * c])}, {"answer": str(10 + 2 * c + (c == 1))}))) for c in range(3))
    assert row["phase_bytes"]["challenge"] == {"down": down, "up": up}
    tally = sum(len(to_bytes(Payload({}, {}))) for _ in range(2)), sum(len(to_bytes(Payload({}, {"ok": "1"}))) for _ in range(2))
    assert row["phase_bytes"]["tally"] == {"down": tally[0], "up": tally[1]}
    assert row["bytes_down"] > down + tally[0]  # the broadcasts of the train phase come on top
    # Client 1 answered but was refused: its staged write is dropped, the others' kept.
    store = rt.store
    for cid in range(3):
        store.settle(cid, *rt.loop.outcomes[cid])
    assert store.get(1, "challenge") is None
    assert float(store.get(0, "challenge")["seen"]) == 1.0 and float(store.get(2, "challenge")["seen"]) == 1.0


def test_a_phase_lacking_a_hook_is_named_when_built():
    class Bare:
        name, when = "bare", "before_train"

        def messages(self, rnd, participants, round_state):
            return {}

        def client(self, env, cid, rnd, meta, tensors):
            return {}, {}

        def receive(self, rnd, replies, round_state):
            return sorted(replies)

        def transform(self, updates, round_state):
            return updates

    if "bare_phase" not in exchanges.names():
        register_exchange("bare_phase", lambda params: [Bare()])
    with pytest.raises(RegistryError, match=r"exchanges\[0\] \(bare_phase\): exchange phase Bare lacks \['on_train_reply', 'metrics'\]"):
        build_phases([{"name": "bare_phase"}])
