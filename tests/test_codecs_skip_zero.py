"""skip_zero anywhere in a chain: it drops all-zero tensors under their State names only,
never the entries other stages made (w.__delta, w.__q, w.__values)."""

from __future__ import annotations

import pytest
import torch

from fedfm.codecs import CodecChain, CodecContext, CodecError, Payload, from_bytes
from fedfm.codecs.skip_zero import SkipZero


def round_trip(specs, state):
    ref = {k: torch.zeros_like(v) for k, v in state.items()}
    chain = CodecChain.from_specs(specs, "codecs.up")
    ctx = CodecContext("up", 0, 1, ref)
    enc = chain.encode(state, {}, ctx)
    return chain.decode(enc.data, ctx)[0], from_bytes(enc.data)


def test_after_topk_an_all_zero_index_tensor_is_kept():
    x = torch.zeros(1000)
    x[0] = 5.0  # kept index 0: its gap tensor w.__delta is [0], all zero
    out, sent = round_trip([{"name": "topk", "count": 1}, {"skip_zero": True}], {"w": x})
    assert sent.tensors["w.__delta"].tolist() == [0]
    assert "__zero" not in sent.meta
    assert torch.equal(out["w"], x)


def test_after_quantize_all_zero_codes_are_kept():
    x = -torch.ones(8)  # 2-bit codes of -max|x| are all 0
    out, sent = round_trip([{"quantize": 2}, {"skip_zero": True}], {"w": x})
    assert sent.tensors["w.__q"].tolist() == [0, 0]
    assert torch.equal(out["w"], x)


def test_after_topk_a_dense_zero_tensor_is_still_skipped():
    state = {"w": torch.zeros(4), "v": torch.tensor([0.0, 2.0, 0.0, 0.0])}
    out, sent = round_trip([{"name": "topk", "count": 1}, {"skip_zero": True}], state)
    assert sent.meta["__zero"] == "w"
    assert sorted(sent.tensors) == ["v"]  # 4 dense floats are cheaper than values + index
    assert out["w"].tolist() == [0.0] * 4 and out["v"].tolist() == [0.0, 2.0, 0.0, 0.0]


def test_decode_refuses_a_listed_name_outside_the_reference():
    ctx = CodecContext("up", 0, 1, {"w": torch.zeros(2)})
    with pytest.raises(CodecError, match="'w.__q' is not in the reference State"):
        SkipZero().decode(Payload({}, {"__zero": "w.__q"}), ctx)
