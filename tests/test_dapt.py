"""Domain-adaptive pre-training: static MLM masking; FFDAPT's frozen layers get no update."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.config import from_dict
from fedfm.core.types import Instruction
from fedfm.learners.local import LocalLearner
from fedfm.peft import get_state
from fedfm.runtime import LocalRuntime
from fedfm.runtime.workbench import Workbench
from fedfm.tasks.masked_lm import IGNORE, mask_example


def test_static_masking():
    ids = [101] + list(range(1000, 1040)) + [102]  # [CLS], 40 words, [SEP]
    inputs, labels = mask_example(ids, {101, 102, 0}, 103, 30522)
    assert (inputs, labels) == mask_example(ids, {101, 102, 0}, 103, 30522)  # same ids, same mask
    masked = [i for i, y in enumerate(labels) if y != IGNORE]
    assert masked and 0 not in masked and len(ids) - 1 not in masked  # special tokens never masked
    assert all(labels[i] == ids[i] for i in masked)
    assert all(inputs[i] == ids[i] for i in range(len(ids)) if i not in masked)
    assert 1 <= len(masked) <= 20  # about 15% of 40
    # a one-word text still gets one masked token
    _, one = mask_example([101, 2000, 102], {101, 102}, 103, 30522)
    assert one == [IGNORE, 2000, IGNORE]


def _dapt(tiny, **peft):
    tiny["model"]["task"] = "masked_lm"
    tiny["peft"] = {"method": "ffdapt", **peft}
    return tiny


def test_ffdapt_frozen_layers_receive_no_update(tmp_path, tiny):
    exp = from_dict(_dapt(tiny, freeze_start=0, freeze_count=1), overrides=["train.steps=2"])
    wb = Workbench(exp)
    before = {n: p.detach().clone() for n, p in wb.model.named_parameters()}
    state = wb.initial_state()
    # tiny BERT has layers 0 and 1: every parameter of layer 0 is frozen, none of layer 1
    assert not any(".layer.0." in k for k in state)
    assert any(".layer.1." in k for k in state) and any("embeddings" in k for k in state)
    update = LocalLearner().local_update(Instruction(round=1, cid=0, state=state), wb.context(0, 1))
    after = dict(wb.model.named_parameters())
    layer0 = [n for n in before if ".layer.0." in n]
    assert layer0 and all(torch.equal(before[n], after[n]) for n in layer0)
    assert all(after[n].grad is None for n in layer0)
    assert any(update.payload[k].abs().sum() > 0 for k in update.payload if ".layer.1." in k)
    assert set(update.payload) == set(get_state(wb.model))


def test_ffdapt_layer_range_is_checked(tmp_path, tiny):
    exp = from_dict(_dapt(tiny, freeze_start=1, freeze_count=2))
    with pytest.raises(ValueError, match="exceed the model's 2 layers"):
        Workbench(exp)


def test_federated_masked_lm_round(tmp_path, tiny):
    out = tmp_path / "run"
    LocalRuntime(from_dict(_dapt(tiny, freeze_count=1), overrides=["rounds=1", "train.steps=2"]), out).run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients"] == [0, 1] and 0 <= rows[1]["accuracy"] <= 1 and rows[1]["loss"] > 0
