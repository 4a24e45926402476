"""DPO with peft's soft prompts on the tiny Llama of tests/tiny_llm.py: the answer tokens
are scored at their own positions (the P virtual tokens' logits come first and are
dropped), and the reference is the starting policy (the initial prompt), so round-0
rewards are exactly 0. For adapters that start as the identity the bound initial State
gives exactly what disabling them gives."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from fedfm.config import ModelConfig, from_dict
from fedfm.peft import apply_tuner, get_state, set_state
from fedfm.runtime import LocalRuntime
from fedfm.tasks import build_task
from fedfm.tasks.causal_lm import IGNORE
from fedfm.tasks.dpo import answer_logps, logps, reference_logps
from test_dpo import assert_trains_and_needs_the_initial_state, dpo_config
from tiny_llm import make_tiny_llm_dir

P = 3
PAIRS = pd.DataFrame(
    {"prompt": ["the cat sat", "a dog ran"], "chosen": [" on the mat.", " to the tree."], "rejected": [" zq!", " x"]}
)
TUNERS = {
    "prompt_tuning": {"num_virtual_tokens": P},
    "p_tuning": {"num_virtual_tokens": P, "encoder_hidden_size": 16},
    "prefix_tuning": {"num_virtual_tokens": P},
}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("llm") / "tiny")


def build(directory, method=None):
    cfg = ModelConfig(task="causal_lm", path=str(directory), init="random", objective={"name": "dpo", "beta": 0.1})
    task = build_task("causal_lm")
    model, tok = task.build(cfg, seed=0)
    if method is not None:
        torch.manual_seed(0)
        model = apply_tuner(model, SimpleNamespace(method=method, params=lambda: dict(TUNERS[method])), "causal_lm")
    model.eval()
    return task, model, tok


def test_answer_logps_drop_the_virtual_positions():
    # V = 4, T = 4 labels, P = 2 virtual positions first: logits (1, 6, 4), all uniform, so
    # each of the 2 labelled tokens costs log 4
    logits = torch.zeros(1, 2 + 4, 4)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2]])
    assert answer_logps(logits, labels).item() == pytest.approx(-2 * math.log(4))
    # a virtual position is never read: there it changes nothing (read without the drop, its
    # row 1 would be the one predicting the label at 2)
    logits[0, 1, 1] = 100.0
    assert answer_logps(logits, labels).item() == pytest.approx(-2 * math.log(4))
    # sequence position 1 (row P + 1 = 3) predicts the label at 2 (token 1): now p ~ 1
    logits[0, 3, 1] = 100.0
    assert answer_logps(logits, labels).item() == pytest.approx(-math.log(4), abs=1e-6)


def test_prompt_tuning_policy_scores_the_answer_at_its_own_positions(llm_dir):
    task, model, tok = build(llm_dir, "prompt_tuning")
    batch = task.collate(task.encode(PAIRS, tok, 48), tok)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # (4, T)
    with torch.no_grad():
        policy = logps(model, batch)  # (4,)
        # by hand: the prompt's P embeddings before the text's, the base model on them
        base = model.get_base_model()
        prompt = model.prompt_encoder["default"].embedding.weight  # (P, H)
        embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
        full = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], dim=1)
        logits = base(inputs_embeds=embeds, attention_mask=full).logits  # (4, P + T, V)
    assert logits.shape[1] == P + ids.shape[1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    expected, misread = [], []
    for row in range(ids.shape[0]):
        answer = [t for t in range(1, ids.shape[1]) if labels[row, t] != IGNORE]
        # token t is predicted at sequence position t - 1, i.e. logit row P + t - 1
        expected.append(sum(logp[row, P + t - 1, labels[row, t]].item() for t in answer))
        misread.append(sum(logp[row, t - 1, labels[row, t]].item() for t in answer))  # the first T rows
    assert policy.tolist() == pytest.approx(expected, abs=1e-4)
    assert not torch.allclose(policy, torch.tensor(misread), atol=1e-2)


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_the_reference_of_a_soft_prompt_is_the_starting_policy(llm_dir, method):
    task, model, tok = build(llm_dir, method)
    batch = task.collate(task.encode(PAIRS, tok, 48), tok)
    initial = get_state(model)
    task.bind_initial(model, initial)  # what the workbench does once, with its template
    assert task.objective.initial is initial
    # round 0: policy = reference, both rewards exactly 0, no pair won, loss log 2
    metrics = task.evaluate(model, [batch])
    assert metrics["chosen_reward"] == 0.0 and metrics["rejected_reward"] == 0.0
    assert metrics["reward_margin"] == 0.0 and metrics["reward_accuracy"] == 0.0
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        start = logps(model, batch)
        with model.disable_adapter():
            no_prompt = logps(model, batch)
    assert not torch.allclose(start, no_prompt, atol=1e-3)  # the initial prompt changes the outputs
    # train-like move of the prompt: the reference stays the starting policy
    gen = torch.Generator().manual_seed(1)
    set_state(model, {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in initial.items()})
    with torch.no_grad():
        moved = logps(model, batch)
    assert not torch.allclose(moved, start, atol=1e-3)
    assert torch.allclose(reference_logps(model, batch, task.objective.initial), start, atol=1e-5)
    # without the initial State a soft prompt has no reference: refused, not the prompt-free model
    assert_trains_and_needs_the_initial_state(task, model, batch)


def test_identity_adapters_initial_state_reference_equals_the_disabled_model(llm_dir):
    task, model, tok = build(llm_dir)
    model = apply_tuner(model, SimpleNamespace(method="lora", params=lambda: {"r": 4, "target_modules": ["q_proj"]}),
                        "causal_lm").eval()
    batch = task.collate(task.encode(PAIRS, tok, 48), tok)
    initial = get_state(model)
    task.bind_initial(model, initial)
    assert task.objective.initial is initial  # kept for every tuner
    gen = torch.Generator().manual_seed(1)
    set_state(model, {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in initial.items()})
    # B = 0 in the initial State: its reference is the base model exactly, as disable_adapter's
    assert torch.equal(reference_logps(model, batch, initial), reference_logps(model, batch))


def test_federated_dpo_with_prompt_tuning_starts_at_zero_rewards(tmp_path):
    raw = dpo_config(tmp_path)
    raw.update(rounds=1, peft={"method": "prompt_tuning", "num_virtual_tokens": 4})
    LocalRuntime(from_dict(raw), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["reward_margin"] == 0.0 and rows[0]["reward_accuracy"] == 0.0
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["clients"] == [0, 1] and rows[1]["reward_margin"] != 0.0
