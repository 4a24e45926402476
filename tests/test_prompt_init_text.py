"""prompt_tuning's ``init: text``: the soft prompt starts as the word embeddings of
``init_text``'s tokens, repeated or cut to ``num_virtual_tokens`` (tiny random Llama +
character tokenizer of tests/tiny_llm.py: one token per character, so the rows are
countable by hand)."""

from __future__ import annotations

import pytest
import torch

from fedfm.config import ConfigError, from_dict
from fedfm.peft import apply_tuner
from fedfm.peft.prompt import PromptTuningParams, prompt_tuning
from fedfm.tasks import build_task

from tiny_llm import char_tokenizer, tiny_llm_config

pytestmark = pytest.mark.usefixtures("one_thread")


def tuned(tmp_path, **peft):
    exp = from_dict({**tiny_llm_config(tmp_path), "peft": {"method": "prompt_tuning", **peft}})
    model, _ = build_task(exp.model.task).build(exp.model, exp.seed)
    return apply_tuner(model, exp.peft, exp.model.task)


def prompt_and_words(model) -> tuple[torch.Tensor, torch.Tensor]:
    return model.prompt_encoder["default"].embedding.weight.detach(), model.get_input_embeddings().weight.detach()


@pytest.mark.parametrize(
    ("text", "p", "chars"),
    [
        ("ab", 5, "ababa"),       # 2 tokens < 5 rows: repeated (ids * 3), first 5 kept
        ("good?", 5, "good?"),    # exactly 5
        ("negative", 3, "neg"),   # 8 tokens > 3 rows: the first 3
    ],
)
def test_rows_are_the_word_embeddings_of_the_text_tokens(tmp_path, text, p, chars):
    model = tuned(tmp_path, num_virtual_tokens=p, init="text", init_text=text)
    prompt, words = prompt_and_words(model)
    ids = char_tokenizer().convert_tokens_to_ids(list(chars))  # one token per character, no special tokens
    assert prompt.shape == (p, words.shape[1])
    assert torch.equal(prompt, words[ids].to(torch.float32))
    assert not torch.equal(prompt[0], prompt[1])  # two different characters: two different rows


def test_sample_vocab_is_still_the_default(tmp_path):
    model = tuned(tmp_path, num_virtual_tokens=5)
    prompt, words = prompt_and_words(model)
    # every row is some vocabulary row, but not the text's
    assert all(any(torch.equal(row, w) for w in words) for row in prompt)


@pytest.mark.parametrize(
    ("peft", "match"),
    [
        ({"init": "text"}, r"peft\.init_text: .*init: text needs the text"),
        ({"init": "sample_vocab", "init_text": "Is it good?"}, r"peft\.init_text: .*init is sample_vocab.*peft\.init: text"),
        ({"init_text": "Is it good?"}, r"peft\.init_text: .*init is sample_vocab"),  # init left at its default
        ({"init": "text", "init_text": ""}, r"peft\.init_text: .*empty"),
    ],
)
def test_bad_init_text_settings_are_refused_naming_the_field(tmp_path, peft, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({**tiny_llm_config(tmp_path), "peft": {"method": "prompt_tuning", **peft}})


def test_a_model_without_a_directory_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_llm import TINY_LLAMA

    model = LlamaForCausalLM(LlamaConfig(vocab_size=120, **TINY_LLAMA))  # built in memory: no name_or_path
    with pytest.raises(ValueError, match=r"peft\.init_text: the model has no local directory"):
        prompt_tuning(model, PromptTuningParams(num_virtual_tokens=2, init="text", init_text="ab"), "causal_lm")


def test_the_verbalizer_example_differs_from_fedbpt_verbalizer_by_the_init_only():
    from pathlib import Path

    from fedfm.config import load_config

    root = Path(__file__).resolve().parents[1] / "examples" / "zeroth_order"
    text, base = (load_config(root / name).dump() for name in ("fedbpt_verbalizer_text.yaml", "fedbpt_verbalizer.yaml"))
    assert text["peft"] == {**base["peft"], "init": "text", "init_text": "Negative or positive?\n"}
    assert {k: v for k, v in text.items() if k not in ("name", "peft")} == {k: v for k, v in base.items() if k not in ("name", "peft")}
