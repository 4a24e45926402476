"""Split learning: one split step gives the unsplit model's gradients (tiny BERT + LoRA),
sends the activations, mask and labels and counts the serialized bytes; prompt-based tuners
are refused at config time."""

from __future__ import annotations

import pytest
import torch

from fedfm.codecs import CodecChain
from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Instruction
from fedfm.learners.split import SplitLearner, SplitParams, bert_parts, client_side, split_step
from fedfm.runtime.workbench import Workbench

from conftest import tiny_config


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    raw = tiny_config(tmp_path_factory.mktemp("split"), **{"peft.train_head": True})
    return Workbench(from_dict(raw))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("cut", [1, 2])
def test_split_step_matches_unsplit_gradients(wb, cut):
    model = wb.model.double()
    model.eval()  # no dropout: both passes see the same function
    # LoRA B starts at zero, so A would get zero gradients: give B values first
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 0.1)
    batch = wb.task.collate(wb.examples(0)[:6], wb.tokenizer)
    model.zero_grad(set_to_none=True)
    ref_loss = wb.task.loss(model, batch)
    ref_loss.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    up, down = CodecChain([]), CodecChain([])
    res = split_step(bert_parts(model), batch, cut, up, down)
    got = grads(model)
    assert res.loss == pytest.approx(ref_loss.item(), rel=1e-12)
    assert set(got) == set(ref) and len(ref) > 4
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-9, atol=1e-12), n
    # both halves hold trainable state at this cut (the server at least the head)
    names = list(ref)
    assert any(client_side(n, cut) for n in names) and any(not client_side(n, cut) for n in names)
    model.float()


def wire(tensors, meta):
    return len(to_bytes(Payload(tensors, meta)))


def test_split_step_sends_activations_mask_and_labels_and_counts_their_bytes(wb):
    # Up: h (6, T, 32) float32 = 6*T*128 bytes, the mask (6, T) uint8 = 6*T, the labels (6,)
    # int64 = 48, in one safetensors message; down: dL/dh (6, T, 32) float32. The counts are
    # exactly the len() of those messages (rebuilt from zeros of the same shapes and dtypes).
    model = wb.model
    model.eval()
    batch = wb.task.collate(wb.examples(0)[:6], wb.tokenizer)
    T = batch["input_ids"].shape[1]
    model.zero_grad(set_to_none=True)
    res = split_step(bert_parts(model), batch, 1, CodecChain([]), CodecChain([]), cid=3)
    model.zero_grad(set_to_none=True)
    up = {"h": torch.zeros(6, T, 32), "mask": torch.zeros(6, T, dtype=torch.uint8), "labels": torch.zeros(6, dtype=torch.long)}
    assert res.bytes_up == wire(up, {"cid": "3"})
    assert res.bytes_down == wire({"h": torch.zeros(6, T, 32)}, {"cid": "3"})
    header = res.bytes_up - (6 * T * 128 + 6 * T + 48)
    assert 100 <= header <= 320


class FlipLabels:
    """A stage that flips the labels in transit: the server half must compute with them."""

    name = "flip_labels"

    def encode(self, payload, ctx):
        return payload

    def decode(self, payload, ctx):
        return Payload({**payload.tensors, "labels": 1 - payload.tensors["labels"]}, payload.meta)


def test_the_server_half_uses_the_labels_it_received(wb):
    model = wb.model
    model.eval()
    batch = wb.task.collate(wb.examples(0)[:6], wb.tokenizer)
    with torch.no_grad():
        flipped = wb.task.loss(model, {**batch, "labels": 1 - batch["labels"]}).item()
        kept = wb.task.loss(model, batch).item()
    model.zero_grad(set_to_none=True)
    res = split_step(bert_parts(model), batch, 1, CodecChain([FlipLabels()]), CodecChain([]))
    model.zero_grad(set_to_none=True)
    assert res.loss == pytest.approx(flipped, rel=1e-5) and abs(flipped - kept) > 1e-4


def test_split_learner_counts_the_client_side_weights_as_serialized_payloads(wb):
    # wire bytes = the split messages + the client-side half's weights, each as one serialized
    # payload: its delta up, the weights it received down (cut 1: embeddings, if trained, and layer 0)
    ctx = wb.context(0, 1)
    ctx.profile = {"cut": 1}
    state = wb.initial_state()
    up = SplitLearner(SplitParams()).local_update(Instruction(round=1, cid=0, state=state), ctx)
    m = up.metrics
    client_delta = {n: t for n, t in up.payload.items() if client_side(n, 1)}
    client_got = {n: t for n, t in state.items() if client_side(n, 1)}
    assert len(client_delta) == 4  # layer 0's LoRA A and B on query and value
    assert m["wire_bytes_up"] == m["split_bytes_up"] + wire(client_delta, {})
    assert m["wire_bytes_down"] == m["split_bytes_down"] + wire(client_got, {})
    raw = sum(t.numel() * t.element_size() for t in client_delta.values())
    assert 4 * 60 <= wire(client_delta, {}) - raw <= 4 * 200  # one header entry per tensor


@pytest.mark.parametrize("learner", ["split", "splitfed"])
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning", "personal_prompt", "diprompt", "fedapt"])
def test_prompt_tuners_are_refused_for_split_learning(tmp_path, learner, method):
    raw = tiny_config(tmp_path, **{"learner": {"name": learner}, "peft": {"method": method}})
    if learner == "splitfed":
        raw["exchanges"] = [{"name": "splitfed", "steps": 2}]
    with pytest.raises(ConfigError, match=rf"learner.name {learner} .*peft.method {method} inserts its soft prompt"):
        from_dict(raw)


def test_lossy_gradient_chain_changes_the_step_and_counts_fewer_bytes(wb):
    model = wb.model
    model.eval()
    batch = wb.task.collate(wb.examples(0)[:6], wb.tokenizer)
    model.zero_grad(set_to_none=True)
    exact = split_step(bert_parts(model), batch, 1, CodecChain([]), CodecChain([]))
    model.zero_grad(set_to_none=True)
    half = split_step(bert_parts(model), batch, 1, CodecChain.from_specs([{"fp16": True}], "up"), CodecChain.from_specs([{"fp16": True}], "down"))
    assert half.bytes_up < exact.bytes_up and half.bytes_down < exact.bytes_down
    model.zero_grad(set_to_none=True)


def test_cut_outside_the_layers_is_refused(wb):
    batch = wb.task.collate(wb.examples(0)[:2], wb.tokenizer)
    with pytest.raises(ValueError, match=r"cut 3 is outside 1..2"):
        split_step(bert_parts(wb.model), batch, 3, CodecChain([]), CodecChain([]), cid=4)
