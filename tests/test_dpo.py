"""DPO objective: the loss on hand-built log-probabilities, answer log-probabilities by
hand, the reference = the base model with the adapters disabled (checked against a
separately built model without adapters), config-time refusals, and a federated run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from fedfm.config import ConfigError, ModelConfig, from_dict
from fedfm.peft import apply_tuner, get_state, set_state
from fedfm.runtime import LocalRuntime
from fedfm.tasks import build_task
from fedfm.tasks.causal_lm import IGNORE
from fedfm.tasks.dpo import DPO, answer_logps, dpo_loss, logps, reference_logps
from tiny_llm import make_tiny_llm_dir, tiny_llm_config


def test_dpo_loss_by_hand():
    # pair 0: chosen reward 0.5 * (-1 - -2) = 0.5, rejected 0.5 * (-3 - -2) = -0.5, margin 1:
    #   loss = -log sigmoid(1) = log(1 + e^-1) = 0.31326
    # pair 1: policy = reference: rewards 0, loss = log 2 = 0.69315
    # pair 2: chosen reward 0.5 * (-4 - -2) = -1, rejected 0.5 * (-1 - -2) = 0.5, margin -1.5:
    #   loss = log(1 + e^1.5) = 1.70141
    pc, pr = torch.tensor([-1.0, -5.0, -4.0]), torch.tensor([-3.0, -7.0, -1.0])
    rc, rr = torch.tensor([-2.0, -5.0, -2.0]), torch.tensor([-2.0, -7.0, -2.0])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert chosen.tolist() == [0.5, 0.0, -1.0]
    assert rejected.tolist() == [-0.5, 0.0, 0.5]
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(1.5))], abs=1e-6)
    # beta scales the margin: beta = 2 on pair 0 gives margin 4, loss log(1 + e^-4) = 0.01815
    assert dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=2.0)[0].item() == pytest.approx(math.log(1 + math.exp(-4)), abs=1e-6)


def test_answer_logps_count_labelled_tokens_only():
    # Uniform logits over V=4: each labelled next token costs log 4. Row 0 labels positions
    # 2 and 3 (2 tokens) -> -2 log 4; row 1 labels position 1 only -> -log 4.
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2], [IGNORE, 3, IGNORE, IGNORE]])
    assert answer_logps(logits, labels).tolist() == pytest.approx([-2 * math.log(4), -math.log(4)])
    logits[1, 0, 3] = 100.0  # position 0 now predicts token 3 (the label at 1) with p ~ 1
    assert answer_logps(logits, labels)[1].item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("llm") / "tiny")


def build(directory, tuner=None):
    cfg = ModelConfig(task="causal_lm", path=str(directory), init="random", objective={"name": "dpo", "beta": 0.1})
    task = build_task("causal_lm")
    model, tok = task.build(cfg, seed=0)  # load_auto seeds: two builds have the same weights
    if tuner is not None:
        method, params = tuner
        model = apply_tuner(model, SimpleNamespace(method=method, params=lambda: params), "causal_lm")
    return task, model, tok


PAIRS = pd.DataFrame(
    {"prompt": ["the cat sat", "a dog ran"], "chosen": [" on the mat.", " to the tree."], "rejected": [" zq!", " x"]}
)


@pytest.mark.parametrize(
    "tuner",
    [
        ("lora", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
        ("ffa_lora", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
        ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    ],
)
def test_reference_is_the_base_model_without_adapters(llm_dir, tuner):
    task, model, tok = build(llm_dir, tuner)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert isinstance(task.objective, DPO)
    batch = task.collate(task.encode(PAIRS, tok, 48), tok)
    assert batch["input_ids"].shape[0] == 4  # 2 chosen rows, then 2 rejected rows
    # move every adapter weight away from its identity value, so the adapters change the output
    state = get_state(model)
    set_state(model, {k: v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in state.items()})
    _, plain, _ = build(llm_dir)  # the same base weights, no adapters at all
    plain.eval()
    model.eval()
    with torch.no_grad():
        base = logps(plain, batch)
        policy = logps(model, batch)
    ref = reference_logps(model, batch)
    assert torch.allclose(ref, base, atol=1e-5), (ref, base)
    assert not torch.allclose(policy, base, atol=1e-3)  # the adapters were active outside the context
    assert torch.equal(logps(model, batch).detach(), policy)  # and are active again after it
    # the same parameters are trainable after the reference pass (FFA-LoRA's A stay frozen)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_encode_plain_labels_answers_only(llm_dir):
    task, _, tok = build(llm_dir)
    enc = task.encode(PAIRS.head(1), tok, 48)[0]
    # "the cat sat" = 11 character tokens (no BOS in the tiny tokenizer), " on the mat." = 12, " zq!" = 4
    assert enc["chosen"]["labels"] == [IGNORE] * 11 + enc["chosen"]["input_ids"][11:]
    assert len(enc["chosen"]["input_ids"]) == 23 and len(enc["rejected"]["input_ids"]) == 15
    assert tok.decode(enc["rejected"]["input_ids"][11:]) == " zq!"
    assert enc["input_ids"] == enc["chosen"]["input_ids"]  # the longer answer sets the sort width
    with pytest.raises(ValueError, match="preferences"):
        task.encode(pd.DataFrame({"text": ["x"]}), tok, 48)


@pytest.mark.parametrize("tuner", [("full", {}), ("salience", {"fraction": 0.25, "target_modules": ["q_proj", "v_proj"]})])
def test_reference_without_adapters_is_the_initial_state(llm_dir, tuner):
    task, model, tok = build(llm_dir, tuner)
    batch = task.collate(task.encode(PAIRS, tok, 48), tok)
    initial = get_state(model)
    task.bind_initial(model, initial)  # what the workbench does once, with its template
    assert task.objective.initial is initial  # held, not copied
    # train-like change: every trainable weight moves, so the policy differs from the start
    gen = torch.Generator().manual_seed(1)
    set_state(model, {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in initial.items()})
    moved = get_state(model)
    _, plain, _ = build(llm_dir)  # the same base weights, never changed
    plain.eval()
    model.eval()
    with torch.no_grad():
        base = logps(plain, batch)
        policy = logps(model, batch)
    ref = reference_logps(model, batch, task.objective.initial)
    assert torch.allclose(ref, base, atol=1e-5), (ref, base)
    assert not torch.allclose(policy, base, atol=1e-3)
    after = get_state(model)  # the reference pass substituted the weights without writing them
    assert all(torch.equal(after[k], moved[k]) for k in moved)
    assert_trains_and_needs_the_initial_state(task, model, batch)


def assert_trains_and_needs_the_initial_state(task, model, batch) -> None:
    """The loss trains the policy (gradients reach every trainable weight; the reference
    has none), and without a bound initial State there is no reference: refused."""
    model.train()
    task.loss(model, batch).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    task.objective.initial = None
    with pytest.raises(ValueError, match="no initial State was bound"):
        task.loss(model, batch)


def test_dpo_refused_where_it_cannot_work(tmp_path):
    raw = dpo_config(tmp_path)
    raw["model"]["objective"]["beta"] = 0
    with pytest.raises(ConfigError, match="model.objective.beta"):
        from_dict(raw)
    raw = dpo_config(tmp_path)
    raw["model"]["task"] = "text_classification"
    with pytest.raises(ConfigError, match="needs model.task"):
        from_dict(raw)


def write_pairs(path, n=160):
    """Chosen answers are the toy sentences' endings, rejected ones character noise: a
    preference a tiny model can learn and carry to held-out groups."""
    rows = []
    for i in range(n):
        subject = ["the cat", "a dog", "my friend", "the king"][i % 4]
        rows.append({
            "prompt": f"{subject} sat on",
            "chosen": [" the mat.", " the moon.", " a tree.", " the queen."][(i // 4) % 4],
            "rejected": [" qzx#", " %vk", " jj@w", " #z#"][(i // 16) % 4],
            "group": f"a{i % 10}",
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def dpo_config(tmp_path) -> dict:
    raw = tiny_llm_config(tmp_path)
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_pairs(data)
    raw["model"]["objective"] = {"name": "dpo", "beta": 0.5}
    raw["data"] = {"source": "preferences", "path": str(data), "group_column": "group", "max_length": 32}
    raw["federation"] = {"clients": 2, "partitioner": {"name": "natural"}, "test_examples": 32, "examples_per_client": 48}
    return raw


def test_federated_dpo_run_reports_rewards(tmp_path):
    exp = from_dict(dpo_config(tmp_path))
    LocalRuntime(exp, tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    for key in ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "chosen_reward", "rejected_reward"):
        assert key in last
    # round 0: the LoRA B matrices start at zero, so the policy IS the reference: rewards 0,
    # no pair counts as won (strictly greater), and the loss is -log sigmoid(0) = log 2
    assert first["reward_margin"] == 0.0 and first["reward_accuracy"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["eval_pairs"] == 32
    assert last["loss"] < math.log(2)
    assert last["reward_accuracy"] > 0.5 and last["reward_margin"] > 0
    assert last["rejected_logp"] < first["rejected_logp"]
    generations = [json.loads(g) for g in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4 and {"prompt", "chosen", "rejected", "generation"} <= set(generations[0])


def test_federated_dpo_with_full_fine_tuning(tmp_path):
    raw = dpo_config(tmp_path)
    raw.update(rounds=1, peft={"method": "full"})
    raw["train"] = {**raw.get("train", {}), "lr": 1e-3}
    LocalRuntime(from_dict(raw), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # round 0: the policy is the initial model, which is the reference: rewards exactly 0
    assert rows[0]["reward_margin"] == 0.0 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["clients"] == [0, 1] and rows[1]["reward_margin"] != 0.0


def test_dpo_composes_with_learner_codec_and_aggregator(tmp_path):
    raw = dpo_config(tmp_path)
    raw.update(rounds=1, learner={"name": "fedprox", "mu": 0.01}, aggregator={"rule": "median"},
               codecs={"up": [{"name": "topk", "fraction": 0.5}, {"name": "fp16"}]})
    raw["peft"] = {"method": "ffa_lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    LocalRuntime(from_dict(raw), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients"] == [0, 1] and not rows[1]["rejected"]
    assert rows[1]["reward_margin"] != 0.0  # the compressed, median-aggregated update moved the policy
