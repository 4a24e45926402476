"""Split learning: one split step gives the unsplit model's gradients (tiny BERT + LoRA);
prompt-based tuners are refused at config time."""

from __future__ import annotations

import pytest
import torch

from fedfm.codecs import CodecChain
from fedfm.config import ConfigError, from_dict
from fedfm.learners.split import bert_parts, client_side, split_step
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
    # both halves hold trainable state at this cut (the server at least the head), and the bytes were counted:
    # activations (6, T, 32) float64 up, their gradient down, plus the safetensors header
    names = list(ref)
    assert any(client_side(n, cut) for n in names) and any(not client_side(n, cut) for n in names)
    numel = 6 * batch["input_ids"].shape[1] * 32
    assert res.bytes_up > numel * 8 and res.bytes_down > numel * 8 and res.bytes_up < numel * 8 + 512
    model.float()


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


@pytest.mark.parametrize("learner", ["split", "splitfed"])
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning", "personal_prompt", "diprompt", "fedapt"])
def test_prompt_tuners_are_refused_for_split_learning(tmp_path, learner, method):
    raw = tiny_config(tmp_path, **{"learner": {"name": learner}, "peft": {"method": method}})
    if learner == "splitfed":
        raw["exchanges"] = [{"name": "splitfed", "steps": 2}]
    with pytest.raises(ConfigError, match=rf"learner.name {learner} .*peft.method {method} inserts its soft prompt"):
        from_dict(raw)
