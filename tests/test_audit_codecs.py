"""Codec chains a demanding user may write: contradictory direction settings are refused."""

from __future__ import annotations

import pytest
import torch

from fedfm.codecs import CodecChain
from fedfm.codecs.base import CodecContext, parse_stage
from fedfm.core.registry import RegistryError
from fedfm.runtime.store import ClientStore


def test_downlink_error_feedback_is_refused_naming_the_stage():
    with pytest.raises(RegistryError, match=r"codecs.down\[1\]: error_feedback is for codecs.up only"):
        parse_stage({"topk": 0.5, "error_feedback": True}, "codecs.down[1]")
    with pytest.raises(RegistryError, match=r"codecs.down\[0\]: error_feedback"):
        CodecChain.from_specs([{"threshold": 0.1, "error_feedback": True}], "codecs.down")
    # the uplink keeps it, and the downlink keeps the sparsifier without it
    assert parse_stage({"randk": 0.5, "error_feedback": True}, "codecs.up[0]")[0] == "randk"
    assert parse_stage({"topk": 0.5}, "codecs.down[0]")[0] == "topk"


def test_delta_in_the_uplink_is_refused_before_any_round():
    with pytest.raises(RegistryError, match=r"codecs.up\[0\]: 'delta' compresses the server broadcast"):
        CodecChain.from_specs([{"delta": True}, {"quantize": 8}], "codecs.up")
    assert CodecChain.from_specs([{"delta": True}, {"topk": 0.5}], "codecs.down").names == ["delta", "topk"]


def test_downlink_delta_corrects_what_top_k_dropped(tmp_path):
    """Why the downlink needs no residual: State [4, 3, 2, 1] through [delta, top-50%].

    Round 1 (no previous State): the client gets [4, 3, 0, 0]. Round 2: the delta against
    that is [0, 0, 2, 1], top-2 keeps both, and the client holds [4, 3, 2, 1] exactly.
    (A residual of round 1's dropped [0, 0, 2, 1] added on top would have sent [4, 3, 4, 2].)
    """
    store = ClientStore(tmp_path)
    state = {"w": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    chain = CodecChain.from_specs([{"delta": True}, {"topk": 0.5}], "codecs.down")
    got = []
    for rnd in (1, 2):
        sent = chain.encode(state, {}, CodecContext("down", rnd, 0, state, store=store))
        got.append(chain.decode(sent.data, CodecContext("down", rnd, 0, state, store=store))[0]["w"].tolist())
    assert got == [[4.0, 3.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0]]
