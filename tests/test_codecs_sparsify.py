"""Sparsification: exact k, error feedback by hand, random-k without indices, and the
per-tensor choice of the cheapest sparse wire format."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from fedfm.codecs import CodecChain, CodecContext, from_bytes
from fedfm.codecs.sparse_format import candidates, cheapest
from fedfm.runtime.store import ClientStore


def header(blob: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8 : 8 + n])


def ctx_for(ref, store=None, cid=0, rnd=1, direction="up"):
    return CodecContext(direction, rnd, cid, ref, seed=0, store=store)


@pytest.mark.parametrize("spec,k", [({"topk": 0.1}, 100), ({"topk": 0.0125}, 13), ({"name": "topk", "count": 7}, 7)])
def test_topk_keeps_exactly_k_largest(spec, k):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    ref = {"w": torch.zeros(1000)}
    chain = CodecChain.from_specs([spec], "codecs.up")
    out, _ = chain.decode(chain.encode({"w": x}, {}, ctx_for(ref)).data, ctx_for(ref))
    kept = out["w"].nonzero().reshape(-1)
    assert kept.numel() == k
    assert set(kept.tolist()) == set(x.abs().topk(k).indices.tolist())
    assert torch.equal(out["w"][kept], x[kept])


def test_topk_with_ties_still_keeps_exactly_k():
    ref = {"w": torch.zeros(50)}
    chain = CodecChain.from_specs([{"topk": 0.1}], "codecs.up")
    out, _ = chain.decode(chain.encode({"w": torch.ones(50)}, {}, ctx_for(ref)).data, ctx_for(ref))
    assert int((out["w"] != 0).sum()) == 5


def test_error_feedback_accumulates_the_dropped_mass(tmp_path):
    store = ClientStore(tmp_path)
    ref = {"w": torch.zeros(4)}
    chain = CodecChain.from_specs([{"name": "topk", "count": 1, "error_feedback": True}], "codecs.up")

    def send(x):
        ctx = ctx_for(ref, store, cid=3)
        return chain.decode(chain.encode({"w": torch.tensor(x)}, {}, ctx).data, ctx)[0]["w"]

    # Round 1: keep -3 (largest |x|); residual = what was dropped.
    sent1 = send([0.5, -3.0, 1.0, 0.2])
    assert sent1.tolist() == [0.0, -3.0, 0.0, 0.0]
    assert torch.allclose(store.get(3, "ef_up_topk")["w"], torch.tensor([0.5, 0.0, 1.0, 0.2]))
    # Round 2: update + residual = [1.1, 0.1, 0.8, 0.3]; the 0.5 dropped before now wins.
    sent2 = send([0.6, 0.1, -0.2, 0.1])
    assert torch.allclose(sent2, torch.tensor([1.1, 0.0, 0.0, 0.0]))
    assert torch.allclose(store.get(3, "ef_up_topk")["w"], torch.tensor([0.0, 0.1, 0.8, 0.3]))
    # Nothing is lost: everything sent + the residual = everything that was to be sent.
    total = torch.tensor([0.5, -3.0, 1.0, 0.2]) + torch.tensor([0.6, 0.1, -0.2, 0.1])
    assert torch.allclose(sent1 + sent2 + store.get(3, "ef_up_topk")["w"], total)
    # Another client has its own memory.
    assert store.get(4, "ef_up_topk") is None


def test_random_k_sends_no_indices_and_the_receiver_redraws_them():
    ref = {"layer.weight": torch.zeros(40, 25)}
    x = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    chain = CodecChain.from_specs([{"randk": 0.1}], "codecs.up")
    ctx = ctx_for(ref, cid=5, rnd=2)
    blob = chain.encode({"layer.weight": x}, {}, ctx).data
    n, head = header(blob)
    assert sorted(k for k in head if k != "__metadata__") == ["layer.weight.__values"]
    assert head["layer.weight.__values"]["shape"] == [100]
    assert len(blob) == 8 + n + 100 * 4  # header + 100 float32 values, nothing else
    out, _ = chain.decode(blob, ctx)
    kept = out["layer.weight"].reshape(-1).nonzero().reshape(-1)
    assert kept.numel() == 100
    assert torch.equal(out["layer.weight"].reshape(-1)[kept], x.reshape(-1)[kept])
    # The indices depend on (seed, round, client): another round draws others.
    other, _ = chain.decode(chain.encode({"layer.weight": x}, {}, ctx_for(ref, cid=5, rnd=3)).data, ctx_for(ref, cid=5, rnd=3))
    assert not torch.equal(other["layer.weight"].nonzero(), out["layer.weight"].nonzero())


def test_threshold_keeps_entries_at_or_above():
    ref = {"w": torch.zeros(6)}
    x = torch.tensor([0.1, -0.5, 0.49, 2.0, -0.51, 0.0])
    chain = CodecChain.from_specs([{"threshold": 0.5}], "codecs.up")
    out, _ = chain.decode(chain.encode({"w": x}, {}, ctx_for(ref)).data, ctx_for(ref))
    assert torch.equal(out["w"], torch.tensor([0.0, -0.5, 0.0, 2.0, -0.51, 0.0]))


def sizes_by_hand(name, values, idx, n, shape):
    """Serialized size of each candidate, built here directly with safetensors."""
    dense = torch.zeros(n)
    dense[idx] = values
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    bitmap = torch.tensor([int(sum(int(b) << j for j, b in enumerate(mask[i : i + 8].tolist()))) for i in range(0, n, 8)], dtype=torch.uint8)
    gaps = torch.diff(idx, prepend=torch.zeros(1, dtype=torch.int64))
    return {
        "dense": len(save({name: dense.reshape(shape)})),
        "bitmap": len(save({name + ".__values": values, name + ".__bitmap": bitmap})),
        "delta": gaps,
    }


@pytest.mark.parametrize(
    "n,idx,expected,delta_dtype",
    [
        (1000, [5], "delta", torch.uint8),  # 1 value + 1 index byte << 125-byte bitmap << 4000 dense
        (1000, list(range(0, 1000, 2)), "bitmap", torch.uint8),  # 500 one-byte gaps > 125-byte bitmap
        (16, list(range(15)), "dense", torch.uint8),  # 64 dense bytes < 60 values + index + a second header entry
        (100000, [0, 70000, 99999], "delta", torch.uint32),  # gap 70000 needs 4 bytes; bitmap 12500
        (2000, [0, 300, 600], "delta", torch.uint16),
    ],
)
def test_sparse_format_choice_is_the_cheapest(n, idx, expected, delta_dtype):
    idx = torch.tensor(idx, dtype=torch.int64)
    values = torch.arange(1, idx.numel() + 1, dtype=torch.float32)
    opts = candidates("w", values, idx, (n,), send_index=True)
    fmt, chosen = cheapest(opts)
    assert fmt == expected
    assert opts["delta"]["w.__delta"].dtype == delta_dtype
    hand = sizes_by_hand("w", values, idx, n, (n,))
    assert torch.equal(opts["delta"]["w.__delta"].to(torch.int64), hand["delta"])
    hand["delta"] = len(save({"w.__values": values, "w.__delta": hand["delta"].to(delta_dtype)}))
    assert hand[expected] == min(hand.values())
    assert len(save(chosen)) == hand[expected]


def test_topk_then_quantize_quantizes_only_the_kept_values():
    ref = {"w": torch.zeros(1000)}
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    chain = CodecChain.from_specs([{"topk": 0.1}, {"quantize": 4}], "codecs.up")
    ctx = ctx_for(ref)
    enc = chain.encode({"w": x}, {}, ctx)
    _, head = header(enc.data)
    assert head["w.__values.__q"]["shape"] == [50]  # 100 kept values, 4 bits each
    assert "w.__delta" in head and head["w.__delta"]["dtype"] == "U8"
    assert list(enc.stage_bytes) == ["input", "topk", "quantize"]
    assert enc.stage_bytes["input"] > enc.stage_bytes["topk"] > enc.stage_bytes["quantize"] == enc.nbytes
    out, _ = chain.decode(enc.data, ctx)
    kept = out["w"].nonzero().reshape(-1)
    assert set(kept.tolist()) <= set(x.abs().topk(100).indices.tolist())
    assert from_bytes(enc.data).meta["w.__values.__q"].startswith("100,F32")


@pytest.mark.parametrize(
    "x,kept",
    [
        ([1.0, 1.0, 1.0, 1.0, 1.0], [0, 1]),
        ([0.0, -3.0, 3.0, 3.0, -3.0, 1.0], [1, 2]),  # four-way tie at |3|: the lowest two
        ([5.0, 1.0, -1.0, 1.0, 0.0], [0, 1]),  # 5 above the tie, then the first 1
        ([1.0, float("nan"), 2.0, 0.5], [1, 2]),  # NaN counts as the largest
    ],
)
def test_topk_ties_go_to_the_lowest_index(x, kept):
    ref = {"w": torch.zeros(len(x))}
    chain = CodecChain.from_specs([{"name": "topk", "count": 2}], "codecs.up")
    out, _ = chain.decode(chain.encode({"w": torch.tensor(x)}, {}, ctx_for(ref)).data, ctx_for(ref))
    got = [i for i, v in enumerate(out["w"].tolist()) if v != 0]
    assert got == kept


def test_threshold_keeps_nan_entries_so_the_server_sees_them():
    ref = {"w": torch.zeros(3)}
    chain = CodecChain.from_specs([{"threshold": 0.5}], "codecs.up")
    out, _ = chain.decode(chain.encode({"w": torch.tensor([0.1, float("nan"), 2.0])}, {}, ctx_for(ref)).data, ctx_for(ref))
    assert out["w"][0] == 0 and torch.isnan(out["w"][1]) and out["w"][2] == 2.0
