"""Garbled or hand-made safetensors headers: a CodecError naming the tensor, through the
chain's decode, and a rejected reply (not an exception) through the server's receive."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fedfm.codecs import CodecChain, CodecContext, CodecError
from fedfm.runtime.receive import receive_update

REF = {"w": torch.zeros(2)}
ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def blob(header) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + bytes(8)


CASES = [
    ([], "header is a JSON list, not an object"),
    (5, "header is a JSON int, not an object"),
    ("w", "header is a JSON str, not an object"),
    ({"w": 3}, "tensor 'w': its header entry is a JSON int"),
    ({"w": {**ENTRY, "data_offsets": ["x", "y"]}}, r"tensor 'w' has no valid data_offsets \(got \['x', 'y'\]"),
    ({"w": {**ENTRY, "data_offsets": [0]}}, "tensor 'w' has no valid data_offsets"),
    ({"w": {**ENTRY, "data_offsets": [0, 8.0]}}, "tensor 'w' has no valid data_offsets"),
    ({"w": {**ENTRY, "data_offsets": [False, True]}}, "tensor 'w' has no valid data_offsets"),
    ({"w": {**ENTRY, "data_offsets": {"a": 0, "b": 8}}}, "tensor 'w' has no valid data_offsets"),
    ({"w": {**ENTRY, "shape": ["2"]}}, "tensor 'w' has no valid shape"),
    ({"w": {**ENTRY, "shape": [-2]}}, "tensor 'w' has no valid shape"),
    ({"w": {**ENTRY, "dtype": 7}}, "tensor 'w' has no valid dtype"),
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "tensor 'w' has no valid dtype"),
    ({"__metadata__": ["cid", "0"], "w": ENTRY}, "'__metadata__' is not an object of strings"),
    ({"__metadata__": {"cid": 0}, "w": ENTRY}, "'__metadata__' is not an object of strings"),
]


@pytest.mark.parametrize("header,message", CASES)
def test_chain_decode_raises_codec_error_naming_the_tensor(header, message):
    ctx = CodecContext("up", 2, 4, REF)
    for chain in (CodecChain([]), CodecChain.from_specs([{"topk": 0.5}, {"quantize": 8}], "codecs.up")):
        with pytest.raises(CodecError, match="^payload " + message):
            chain.decode(blob(header), ctx)


def test_deeply_nested_header_is_a_codec_error():
    head = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CodecError, match="nested too deeply"):
        CodecChain([]).decode(struct.pack("<Q", len(head)) + head, CodecContext("up", 0, 1, REF))


@pytest.mark.parametrize("header,message", CASES)
def test_receive_rejects_the_reply_and_the_round_goes_on(header, message):
    chain = CodecChain.from_specs([{"quantize": 8}, {"checksum": True}], "codecs.up")
    update, reason = receive_update(chain, blob(header), 2, 4, REF, 0, None, None)
    assert update is None
    assert reason.startswith("decode failed: payload ")
    # The same receive still accepts a good reply afterwards.
    good = chain.encode({"w": torch.tensor([1.0, -1.0])}, {"cid": "4", "num_examples": "3"}, CodecContext("up", 2, 4, REF)).data
    update, reason = receive_update(chain, good, 2, 4, REF, 0, None, None)
    assert reason is None and update.num_examples == 3
    assert update.payload["w"].tolist() == [1.0, -1.0]
