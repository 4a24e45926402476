"""Trainable State get/set, FedAvg by hand, and exact byte counts on the wire."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fedfm.aggregators import apply_delta, fedavg
from fedfm.codecs import CodecChain, CodecContext, CodecError
from fedfm.config import from_dict
from fedfm.peft import count_params, get_state, set_state
from fedfm.runtime import LocalRuntime, Workbench

from conftest import record_replies


def test_fedavg_hand_computed():
    state = {"w": torch.tensor([1.0, 1.0])}
    deltas = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    # weights 1 and 3: mean = (1*[1,0] + 3*[0,4]) / 4 = [0.25, 3.0]
    out = fedavg(state, deltas, [1, 3])
    assert torch.equal(out["w"], torch.tensor([0.25, 3.0]))
    assert torch.equal(apply_delta(state, out)["w"], torch.tensor([1.25, 4.0]))


def test_fedavg_rejects_empty():
    with pytest.raises(ValueError, match="at least one update"):
        fedavg({"w": torch.zeros(1)}, [], [])


def test_lora_state_round_trip_and_frozen_untouched(tiny):
    wb = Workbench(from_dict(tiny))
    state = get_state(wb.model)
    # LoRA A/B on query+value in 2 layers (r=4, hidden 32) + the classifier head copy.
    lora = 2 * 2 * (4 * 32 + 32 * 4)
    head = 32 * 2 + 2
    assert sum(t.numel() for t in state.values()) == lora + head
    frozen = {n: p.detach().clone() for n, p in wb.model.named_parameters() if not p.requires_grad}
    new = {k: torch.full_like(v, 0.5) for k, v in state.items()}
    set_state(wb.model, new)
    assert all(torch.equal(get_state(wb.model)[k], new[k]) for k in new)
    for n, p in wb.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n])
    with pytest.raises(KeyError, match="missing"):
        set_state(wb.model, {k: v for k, v in list(new.items())[1:]})
    bad = dict(new)
    name = next(iter(bad))
    bad[name] = torch.zeros(3)
    with pytest.raises(ValueError, match="has shape"):
        set_state(wb.model, bad)


def test_full_finetuning_trains_everything(tiny):
    tiny["peft"] = {"method": "full"}
    wb = Workbench(from_dict(tiny))
    trainable, total = count_params(wb.model)
    assert trainable == total


def test_bytes_up_equals_safetensors_size_of_the_state(tmp_path, tiny):
    exp = from_dict(tiny, overrides=["rounds=1"])
    rt = LocalRuntime(exp, tmp_path / "run")
    sent = record_replies(rt)
    rt.run()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    state = rt.wb.initial_state()
    n_params = sum(t.numel() for t in state.values())
    assert len(sent) == len(row["clients"]) == 2
    assert row["bytes_up"] == sum(len(b) for b in sent)
    for blob in sent:
        # safetensors = 8-byte header length + JSON header + raw float32 data, nothing else.
        (header_len,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + header_len])
        assert len(blob) == 8 + header_len + n_params * 4
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        assert set(tensors) == set(state)
        assert all(v["dtype"] == "F32" for v in tensors.values())
        assert header["__metadata__"]["num_examples"] in {str(c.num_examples) for c in rt.wb.clients}


def test_truncated_payload_is_a_codec_error():
    chain = CodecChain([])
    ref = {"a": torch.zeros(4)}
    ctx = CodecContext("up", 1, 0, ref)
    data = chain.encode({"a": torch.ones(4)}, {}, ctx).data
    state, _ = chain.decode(data, ctx)
    assert torch.equal(state["a"], torch.ones(4))
    with pytest.raises(CodecError, match="truncated"):
        chain.decode(data[:-3], ctx)
    with pytest.raises(CodecError):
        chain.decode(b"\x01\x00", ctx)
    wrong = chain.encode({"b": torch.ones(4)}, {}, ctx).data
    with pytest.raises(CodecError, match="do not match"):
        chain.decode(wrong, ctx)
