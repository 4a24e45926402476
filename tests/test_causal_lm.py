"""Causal LM task: chat rendering, response-only label masks, loss/perplexity by hand,
and the LoRA State on q/v projections of a tiny random Llama."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from fedfm.config import ModelConfig
from fedfm.peft import apply_tuner, get_state, set_state
from fedfm.tasks import build_task
from fedfm.tasks.causal_lm import IGNORE, encode_pair, encode_text, render_pair, token_stats
from tiny_llm import char_tokenizer, make_tiny_llm_dir

PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_chat_template_renders_prompt_and_response(tok):
    prompt, answer = render_pair(tok, "Hi", "Yo")
    assert prompt == PROMPT
    assert answer == "Yo<|im_end|>\n"


def test_response_only_label_mask(tok):
    enc = encode_pair(tok, "Hi", "Yo", max_length=64)
    # prompt: <|im_start|> u s e r \n H i <|im_end|> \n <|im_start|> a s s i s t a n t \n = 21 tokens
    # response: Y o <|im_end|> \n = 4 tokens
    assert len(enc["input_ids"]) == 25
    assert enc["labels"][:21] == [IGNORE] * 21
    assert enc["labels"][21:] == enc["input_ids"][21:]
    assert tok.decode(enc["labels"][21:]) == "Yo<|im_end|>\n"
    assert tok.convert_ids_to_tokens(enc["input_ids"][:2]) == ["<|im_start|>", "u"]


def test_long_pairs_cut_prompt_left_and_keep_response(tok):
    enc = encode_pair(tok, "Hi", "Yo", max_length=10)
    # the response (4) fits in half of 10, so the last 6 prompt tokens stay: "stant\n"
    assert len(enc["input_ids"]) == 10
    assert enc["labels"] == [IGNORE] * 6 + enc["input_ids"][6:]
    assert tok.decode(enc["input_ids"][:6]) == "stant\n"


def test_plain_text_labels_every_token(tok):
    enc = encode_text(tok, "to be", max_length=4)
    assert enc["input_ids"] == enc["labels"]
    assert tok.decode(enc["input_ids"]) == "to b"


def test_collate_pads_labels_with_ignore(tok):
    task = build_task("causal_lm")
    batch = task.collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], tok)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_token_stats_by_hand():
    # Uniform logits over V=4: every counted token costs ln 4. Labels shift by one, so row 0
    # counts positions 1 and 2 (2 tokens) and row 1 counts nothing past its first token.
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[IGNORE, 1, 2], [3, IGNORE, IGNORE]])
    nll, count, correct = token_stats(logits, labels)
    assert count == 2
    assert nll.item() == pytest.approx(2 * math.log(4))
    assert correct == 0  # argmax of a uniform row is token 0
    logits[0, 0, 1] = 10.0  # position 0 now predicts token 1 = label at position 1
    assert token_stats(logits, labels)[2] == 1


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))  # (B, T, V)


def test_perplexity_of_uniform_model_is_vocab_size(tok):
    task = build_task("causal_lm")
    batch = task.collate([encode_text(tok, "hello", 16), encode_text(tok, "hi", 16)], tok)
    vocab = len(tok)
    metrics = task.evaluate(Uniform(vocab), [batch])
    assert metrics["eval_tokens"] == 4 + 1  # 5 - 1 next tokens of "hello", 2 - 1 of "hi"
    assert metrics["loss"] == pytest.approx(math.log(vocab))
    assert metrics["perplexity"] == pytest.approx(vocab)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    directory = make_tiny_llm_dir(tmp_path_factory.mktemp("llm") / "tiny")
    cfg = ModelConfig(task="causal_lm", path=str(directory), init="random")
    task = build_task("causal_lm")
    model, tokenizer = task.build(cfg, seed=0)
    spec = SimpleNamespace(method="lora", params=lambda: {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    return task, apply_tuner(model, spec, "causal_lm"), tokenizer


def test_lora_state_on_q_v_round_trips(tiny_model):
    task, model, tokenizer = tiny_model
    state = get_state(model)
    # 2 layers x (q_proj, v_proj) x (A, B); hidden 32, 2 kv heads x head_dim 8 = 16 for v.
    assert len(state) == 8
    assert all(("q_proj" in k or "v_proj" in k) and "lora_" in k for k in state)
    q_b = next(v for k, v in state.items() if "layers.0" in k and "q_proj.lora_B" in k)
    v_b = next(v for k, v in state.items() if "layers.0" in k and "v_proj.lora_B" in k)
    assert tuple(q_b.shape) == (32, 4) and tuple(v_b.shape) == (16, 4)
    assert sum(t.numel() for t in state.values()) == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    batch = task.collate([encode_text(tokenizer, "to be or not", 32)], tokenizer)
    before = task.loss(model, batch).item()  # lora_B starts at zero: the base model's loss
    changed = {k: v + 0.05 * (1 + torch.arange(v.numel()).reshape(v.shape) % 3) for k, v in state.items()}
    set_state(model, changed)
    assert all(torch.equal(get_state(model)[k], changed[k]) for k in changed)
    assert task.loss(model, batch).item() != before
    set_state(model, state)
    assert task.loss(model, batch).item() == before


def test_finish_writes_generations(tiny_model, tmp_path):
    task, model, tokenizer = tiny_model
    held_out = pd.DataFrame({"text": ["the cat sat on the mat", "a dog ran"], "prompt": [None, "Say hi"]})
    path = task.finish(model, tokenizer, tmp_path, held_out)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat sat on the mat", "Say hi"]
    assert all(isinstance(r["generation"], str) for r in rows)
