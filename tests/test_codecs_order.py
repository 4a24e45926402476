"""Stage orders no payload survives are refused when the chain is built, naming the
stage's place in the config."""

from __future__ import annotations

import pytest
import torch

from fedfm.codecs import CodecChain, CodecContext
from fedfm.codecs.chain import order_problem
from fedfm.core.registry import RegistryError


@pytest.mark.parametrize(
    "specs,message",
    [
        ([{"compact": True}, {"topk": 0.5}], r"codecs.up\[1\]: 'topk' cannot follow 'compact' \(codecs.up\[0\]\)"),
        ([{"topk": 0.5}, {"compact": True}, {"quantize": 8}], r"codecs.up\[2\]: 'quantize' cannot follow 'compact' \(codecs.up\[1\]\)"),
        ([{"topk": 0.5}, {"checksum": True}, {"fp16": True}], r"codecs.up\[2\]: 'fp16' cannot follow 'checksum' \(codecs.up\[1\]\)"),
        ([{"checksum": True}, {"compact": True}], r"codecs.up\[1\]: 'compact' cannot follow 'checksum'.*must be the last stage"),
        # fp16 leaves no float32 tensor: bf16 after it would cast nothing, and the payload travel as fp16
        ([{"fp16": True}, {"topk": 0.5}, {"bf16": True}], r"codecs.up\[2\]: 'bf16' after 'fp16' \(codecs.up\[0\]\) casts nothing"),
    ],
)
def test_orders_that_cannot_decode_are_refused(specs, message):
    with pytest.raises(RegistryError, match=message):
        CodecChain.from_specs(specs, "codecs.up")


@pytest.mark.parametrize(
    "specs",
    [
        [{"topk": 0.5}, {"quantize": 4}, {"compact": True}, {"checksum": True}],
        [{"quantize": 4}, {"topk": 0.5}, {"compact": True}],  # topk finds nothing dense: legal
        [{"topk": 0.5}, {"skip_zero": True}, {"compact": True}],
        [{"compact": True}],
        [{"checksum": True}],
        [{"quantize": 8}, {"bf16": True}],  # casts the float32 scales
    ],
)
def test_legal_orders_build_and_round_trip(specs):
    assert order_problem([next(iter(s)) for s in specs], "codecs.up") is None
    ref = {"w": torch.zeros(40), "v": torch.zeros(3)}
    x = {"w": torch.arange(40.0) - 20, "v": torch.zeros(3)}
    chain = CodecChain.from_specs(specs, "codecs.up")
    ctx = CodecContext("up", 0, 1, ref)
    out, _ = chain.decode(chain.encode(x, {}, ctx).data, ctx)
    assert {k: tuple(t.shape) for k, t in out.items()} == {"w": (40,), "v": (3,)}
    assert out["v"].tolist() == [0.0] * 3


def test_a_config_with_such_an_order_is_refused_before_anything_loads(tmp_path):
    from conftest import tiny_config
    from fedfm.config import ConfigError, from_dict

    raw = tiny_config(tmp_path, codecs={"up": [{"topk": 0.5}], "down": [{"compact": True}, {"fp16": True}]})
    with pytest.raises(ConfigError, match=r"codecs.down\[1\]: 'fp16' cannot follow 'compact' \(codecs.down\[0\]\)"):
        from_dict(raw)
