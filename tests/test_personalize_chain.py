"""DAPT chained into fine-tuning: ``model.init_from`` and ``run_chain``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedfm.config import from_dict
from fedfm.personalize.init_from import base_name, run_chain
from fedfm.runtime.workbench import Workbench

from conftest import tiny_config


def test_base_name_strips_tuner_prefixes():
    assert base_name("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight") == (
        "bert.encoder.layer.0.attention.self.query.weight"
    )
    assert base_name("bert.embeddings.word_embeddings.weight") == "bert.embeddings.word_embeddings.weight"


def test_masked_lm_stage_initialises_the_classifier_encoder(tmp_path):
    dapt = tiny_config(tmp_path, rounds=1, **{"model.task": "masked_lm", "train.steps": 2})
    dapt["peft"] = {"method": "ffdapt", "freeze_start": 0, "freeze_count": 1}
    tune = tiny_config(tmp_path, rounds=1, **{"train.steps": 1})
    summaries = run_chain([dapt, tune], tmp_path / "chain")
    assert len(summaries) == 2
    final = load_file(str(tmp_path / "chain" / "stage-0" / "final.safetensors"))
    # stage 0 trained layer 1 and the embeddings (layer 0 frozen) plus the MLM head
    assert any(".layer.1." in k for k in final) and not any(".layer.0." in k for k in final)
    assert any(k.startswith("cls.") for k in final)

    # A fresh workbench of the fine-tuning config with init_from holds stage 0's tensors.
    raw = tiny_config(tmp_path, **{"model.init_from": str(tmp_path / "chain" / "stage-0")})
    wb = Workbench(from_dict(raw))
    plain = Workbench(from_dict(tiny_config(tmp_path)))
    params = {base_name(n): p for n, p in wb.model.named_parameters()}
    shared = [k for k in final if not k.startswith("cls.")]
    assert shared and all(torch.equal(params[k], final[k]) for k in shared)
    # the DAPT stage moved them, so they differ from the plain start
    plain_params = {base_name(n): p for n, p in plain.model.named_parameters()}
    assert any(not torch.equal(plain_params[k], final[k]) for k in shared)
    # frozen layer 0 and the classifier head are the plain start's
    for k, p in params.items():
        if ".layer.0." in k or k.startswith("classifier."):
            assert torch.equal(p, plain_params[k]), k


def test_init_from_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.init_from: no final State"):
        Workbench(from_dict(tiny_config(tmp_path, **{"model.init_from": str(tmp_path / "nowhere")})))
    lora = tmp_path / "lora.safetensors"
    save_file({"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(ValueError, match="adapter tensors"):
        Workbench(from_dict(tiny_config(tmp_path, **{"model.init_from": str(lora)})))
    bad = tmp_path / "bad.safetensors"
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(ValueError, match=r"has shape \(3, 3\)"):
        Workbench(from_dict(tiny_config(tmp_path, **{"model.init_from": str(bad)})))
    none = tmp_path / "none.safetensors"
    save_file({"something.else": torch.zeros(2)}, str(none))
    with pytest.raises(ValueError, match="none of the 1 tensors"):
        Workbench(from_dict(tiny_config(tmp_path, **{"model.init_from": str(none)})))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"12345")  # shorter than a header
    with pytest.raises(ValueError, match=r"model.init_from: .*damaged.safetensors: not a readable safetensors file \(.*header"):
        Workbench(from_dict(tiny_config(tmp_path, **{"model.init_from": str(damaged)})))


def test_a_chain_of_three_keeps_what_the_first_stage_trained(tmp_path):
    """Stage 1 (bitfit) trains biases only, so its final State lacks the weights stage 0
    (full) trained: a run started from stage 1 loads stage 0's State first, then stage 1's."""
    first = tiny_config(tmp_path, rounds=1, peft={"method": "full"}, **{"train.steps": 1, "train.lr": 1e-3})
    second = tiny_config(tmp_path, rounds=1, peft={"method": "bitfit"}, **{"train.steps": 1})
    run_chain([first, second], tmp_path / "chain")
    s0 = load_file(str(tmp_path / "chain" / "stage-0" / "final.safetensors"))
    s1 = load_file(str(tmp_path / "chain" / "stage-1" / "final.safetensors"))
    weight, bias = "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.query.bias"
    assert weight in s0 and weight not in s1 and bias in s1
    wb = Workbench(from_dict(tiny_config(tmp_path, peft={"method": "full"}, **{"model.init_from": str(tmp_path / "chain" / "stage-1")})))
    params = dict(wb.model.named_parameters())
    plain = dict(Workbench(from_dict(tiny_config(tmp_path, peft={"method": "full"}))).model.named_parameters())
    assert torch.equal(params[weight], s0[weight]) and not torch.equal(s0[weight], plain[weight])
    assert torch.equal(params[bias], s1[bias]) and not torch.equal(s1[bias], s0[bias])
    # an earlier run that is gone is named, not skipped
    import shutil

    shutil.rmtree(tmp_path / "chain" / "stage-0")
    with pytest.raises(FileNotFoundError, match="started from .*stage-0 .*which is not found"):
        Workbench(from_dict(tiny_config(tmp_path, peft={"method": "full"}, **{"model.init_from": str(tmp_path / "chain" / "stage-1")})))
