"""Error feedback over rounds where a tensor is absent: skipped as zero by skip_zero, or
missing from the payload. Every round, for every tensor, sent + new residual == input +
old residual; no residual is thrown away."""

from __future__ import annotations

import torch

from fedfm.codecs import CodecChain, CodecContext, from_bytes
from fedfm.runtime.store import ClientStore

REF = {"a": torch.zeros(4), "b": torch.zeros(4)}
KEY = "ef_up_topk"


def ctx_for(store, rnd, ref=REF):
    return CodecContext("up", rnd, 3, ref, seed=0, store=store)


def memory(store, key=KEY):
    got = store.get(3, key) or {}
    return {k: got.get(k, torch.zeros(4)) for k in REF}


def test_skip_zero_then_topk_ef_keeps_and_sends_the_residual_of_an_untrained_tensor(tmp_path):
    store = ClientStore(tmp_path)
    chain = CodecChain.from_specs([{"skip_zero": True}, {"name": "topk", "count": 1, "error_feedback": True}], "codecs.up")
    rounds = [
        {"a": torch.tensor([1.0, -4.0, 2.0, 0.5]), "b": torch.tensor([0.0, 0.0, 3.0, 0.0])},
        {"a": torch.zeros(4), "b": torch.tensor([1.0, 0.0, 0.0, 0.0])},  # a untrained this round
    ] + [{"a": torch.zeros(4), "b": torch.zeros(4)} for _ in range(3)]
    # What travels for a: its own -4, then its round-0 residual [1, 0, 2, 0.5], largest first.
    sent_a = [[0.0, -4.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5], [0.0] * 4]
    skipped = ["", "", "b", "b", "a;b"]
    total = {k: torch.zeros(4) for k in REF}
    for rnd, update in enumerate(rounds):
        old = memory(store)
        enc = chain.encode(update, {}, ctx_for(store, rnd))
        out, _ = chain.decode(enc.data, ctx_for(store, rnd))
        new = memory(store)
        for k in REF:
            assert torch.equal(out[k] + new[k], update[k] + old[k]), (rnd, k)
            total[k] += out[k]
        assert out["a"].tolist() == sent_a[rnd]
        assert from_bytes(enc.data).meta.get("__zero", "") == skipped[rnd]
    # Everything a was given has travelled, and nothing is left behind.
    assert torch.equal(total["a"], rounds[0]["a"])
    assert torch.equal(total["b"], torch.tensor([1.0, 0.0, 3.0, 0.0]))
    assert memory(store)["a"].tolist() == [0.0] * 4


def test_a_tensor_missing_from_the_payload_keeps_its_residual_until_it_returns(tmp_path):
    store = ClientStore(tmp_path)
    chain = CodecChain.from_specs([{"name": "topk", "count": 1, "error_feedback": True}], "codecs.up")
    ctx = ctx_for(store, 0)
    chain.decode(chain.encode({"a": torch.tensor([1.0, -4.0, 2.0, 0.5]), "b": torch.ones(4)}, {}, ctx).data, ctx)
    assert memory(store)["a"].tolist() == [1.0, 0.0, 2.0, 0.5]
    # Round 1 carries b only: a's residual stays as it was.
    chain.encode({"b": torch.zeros(4)}, {}, ctx_for(store, 1, {"b": REF["b"]}))
    assert sorted(store.get(3, KEY)) == ["a", "b"]
    assert memory(store)["a"].tolist() == [1.0, 0.0, 2.0, 0.5]
    # Round 2: a is back with [0, 1, 0, 0]; corrected [1, 1, 2, 0.5] sends the 2.
    ctx = ctx_for(store, 2)
    out, _ = chain.decode(chain.encode({"a": torch.tensor([0.0, 1.0, 0.0, 0.0]), "b": torch.zeros(4)}, {}, ctx).data, ctx)
    assert out["a"].tolist() == [0.0, 0.0, 2.0, 0.0]
    assert memory(store)["a"].tolist() == [1.0, 1.0, 0.0, 0.5]


def test_a_residual_below_the_threshold_waits_skipped_and_is_sent_when_it_grows(tmp_path):
    store = ClientStore(tmp_path)
    chain = CodecChain.from_specs([{"skip_zero": True}, {"threshold": 1.0, "error_feedback": True}], "codecs.up")
    ref = {"a": torch.zeros(2)}

    def send(rnd, x):
        ctx = CodecContext("up", rnd, 3, ref, seed=0, store=store)
        enc = chain.encode({"a": torch.tensor(x)}, {}, ctx)
        return chain.decode(enc.data, ctx)[0]["a"].tolist(), from_bytes(enc.data).meta.get("__zero"), store.get(3, "ef_up_threshold")["a"].tolist()

    assert send(0, [0.5, 2.0]) == ([0.0, 2.0], None, [0.5, 0.0])
    # Zero update, residual 0.5 < 1: nothing to send, a stays skipped, its residual kept.
    assert send(1, [0.0, 0.0]) == ([0.0, 0.0], "a", [0.5, 0.0])
    assert send(2, [0.6, 0.0]) == ([1.100000023841858, 0.0], None, [0.0, 0.0])
