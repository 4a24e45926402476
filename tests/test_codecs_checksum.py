"""The checksum stage covers tensors and metadata: a flipped bit of num_examples (the
aggregation weight) is refused, and so is every single-bit flip of a payload."""

from __future__ import annotations

import pytest
import torch

from fedfm.codecs import CodecChain, CodecContext, CodecError

REF = {"a.weight": torch.zeros(3, 4), "b.bias": torch.zeros(5)}
META = {"cid": "2", "num_examples": "250"}


def encoded(specs):
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(v.shape, generator=g) for k, v in REF.items()}
    chain = CodecChain.from_specs(specs, "codecs.up")
    return chain, chain.encode(x, META, CodecContext("up", 1, 2, REF)).data


def flip_num_examples(data: bytes) -> bytes:
    at = data.index(b'"num_examples":"250"') + len(b'"num_examples":"25')
    out = bytearray(data)
    out[at] ^= 1  # "250" -> "251": still valid JSON
    return bytes(out)


def test_a_flipped_bit_of_num_examples_is_refused():
    ctx = CodecContext("up", 1, 2, REF)
    plain, data = encoded([{"quantize": 8}])
    assert plain.decode(flip_num_examples(data), ctx)[1]["num_examples"] == "251"  # unnoticed without it
    checked, data = encoded([{"quantize": 8}, {"checksum": True}])
    assert checked.decode(data, ctx)[1] == META
    with pytest.raises(CodecError, match="stage 'checksum': payload checksum mismatch"):
        checked.decode(flip_num_examples(data), ctx)


def test_every_single_bit_flip_is_refused():
    chain, data = encoded([{"quantize": 8}, {"checksum": True}])
    ctx = CodecContext("up", 1, 2, REF)
    accepted = []
    for bit in range(len(data) * 8):
        out = bytearray(data)
        out[bit // 8] ^= 1 << (bit % 8)
        try:
            chain.decode(bytes(out), ctx)
        except CodecError:
            continue
        accepted.append(bit)
    assert accepted == []
