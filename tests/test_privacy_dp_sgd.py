"""Sample-level DP-SGD on the trainable parameters: per-example clipping, the noise, the
equivalence with plain SGD when neither clips nor noises, and the per-client accountant."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_BERT, tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Instruction, Update
from fedfm.peft.state import get_state, set_state
from fedfm.privacy.accounting import Plan, epsilon
from fedfm.privacy.dp_sgd import DpSgdAccountant, DpSgdAccountantParams, DpSgdLearner, DpSgdParams, clip_and_sum
from fedfm.runtime import LocalRuntime
from fedfm.runtime.outputs import read_metrics
from fedfm.runtime.workbench import Workbench


def test_clip_and_sum_by_hand():
    # (3, 4) has norm 5 -> clipped to C = 1: (0.6, 0.8); (0.3, 0.4) (norm 0.5) stays; sum (0.9, 1.2)
    total, clipped = clip_and_sum([[torch.tensor([3.0, 4.0])], [torch.tensor([0.3, 0.4])]], 1.0)
    assert torch.allclose(total[0], torch.tensor([0.9, 1.2], dtype=torch.float64)) and clipped == 1


def no_dropout(tmp_path, **over):
    raw = tiny_config(tmp_path, **{"model.config_overrides": {**TINY_BERT, "hidden_dropout_prob": 0.0,
                                                              "attention_probs_dropout_prob": 0.0}, **over})
    return from_dict(raw)


def test_without_clip_or_noise_it_is_one_full_batch_sgd_step(tmp_path):
    # batch_size >= examples -> q = 1: every example each step; C huge, sigma 0: the step is
    # the mean of the per-example gradients = the gradient of the mean loss of the batch.
    exp = no_dropout(tmp_path, **{"train.optimizer": "sgd", "train.lr": 0.5, "train.steps": 1, "train.batch_size": 1000,
                                  "learner": {"name": "dp_sgd", "clip_norm": 1e6, "noise_multiplier": 0.0},
                                  "server_steps": [{"name": "dp_sgd_accountant"}]})
    wb = Workbench(exp)
    start = wb.initial_state()
    ctx = wb.context(0, 1)
    ctx.examples = ctx.examples[:12]
    upd = DpSgdLearner(DpSgdParams(clip_norm=1e6, noise_multiplier=0.0)).local_update(Instruction(1, 0, start), ctx)
    assert upd.metrics["dp_sgd.sample_rate"] == 1.0 and upd.metrics["examples_seen"] == 12
    set_state(wb.model, start)
    params = [p for p in wb.model.parameters() if p.requires_grad]
    loss = wb.task.loss(wb.model, wb.task.collate(ctx.examples, wb.tokenizer))
    grads = torch.autograd.grad(loss, params)
    names = [n for n, p in wb.model.named_parameters() if p.requires_grad]
    for name, g in zip(names, grads):
        assert torch.allclose(upd.payload[name], -0.5 * g, atol=1e-6), name


def test_noise_std_is_sigma_c_over_expected_batch(tmp_path):
    # C = 1e-4 makes the clipped gradients negligible; sigma = 1e4 -> noise on the sum of std
    # sigma * C = 1; divided by the expected batch 8 (batch_size 8, q = 8/n) -> std 0.125;
    # SGD with lr 1 and one step: the delta is minus that.
    exp = no_dropout(tmp_path, **{"train.optimizer": "sgd", "train.lr": 1.0, "train.steps": 1, "train.batch_size": 8,
                                  "learner": {"name": "dp_sgd", "clip_norm": 1e-4, "noise_multiplier": 1e4},
                                  "server_steps": [{"name": "dp_sgd_accountant"}]})
    wb = Workbench(exp)
    ctx = wb.context(0, 1)
    upd = DpSgdLearner(DpSgdParams(clip_norm=1e-4, noise_multiplier=1e4)).local_update(Instruction(1, 0, wb.initial_state()), ctx)
    flat = torch.cat([v.flatten().double() for v in upd.payload.values()])
    assert len(flat) > 1000
    assert abs(float(flat.std()) - 0.125) < 0.125 * 0.06  # ~1,100 draws: relative error of the std ~2%
    assert get_state(wb.model).keys() == upd.payload.keys()


def test_accountant_reports_the_worst_client():
    # client 0: q 0.1, sigma 1, 2 rounds of 50 steps = 100 steps -> 7.90 (Poisson RDP);
    # client 1: 10 steps only -> far less. The worst is client 0's.
    step = DpSgdAccountant(DpSgdAccountantParams(delta=1e-5))
    ctx = SimpleNamespace(num_clients=3)
    m = {"dp_sgd.sample_rate": 0.1, "dp_sgd.noise_multiplier": 1.0, "steps": 50.0}
    _, st, _ = step([Update(0, {}, 1, metrics=m), Update(1, {}, 1, metrics={**m, "steps": 10.0})], ctx, {})
    _, st, met = step([Update(0, {}, 1, metrics=m)], ctx, st)
    assert st["steps"].tolist() == [100.0, 10.0, 0.0]
    assert met["epsilon_worst"] == pytest.approx(7.90, abs=0.01)
    assert met["epsilon_worst"] == pytest.approx(epsilon(Plan(10, 1, "poisson"), [1.0] * 100, 1e-5))
    with pytest.raises(ValueError, match="no dp_sgd metrics"):
        step([Update(2, {}, 1, metrics={})], ctx, st)


def test_config_needs_the_accountant(tmp_path):
    with pytest.raises(ConfigError, match="dp_sgd_accountant"):
        from_dict(tiny_config(tmp_path, learner={"name": "dp_sgd", "clip_norm": 1.0, "noise_multiplier": 1.0}))


def test_tiny_dp_sgd_run_reports_epsilon(tmp_path):
    raw = tiny_config(tmp_path, **{"train.steps": 3, "train.batch_size": 4, "learner": {"name": "dp_sgd", "clip_norm": 1.0, "noise_multiplier": 1.0},
                                   "server_steps": [{"name": "dp_sgd_accountant", "delta": 1e-5}]})
    LocalRuntime(from_dict(raw), tmp_path / "run").run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    eps = [r["dp_sgd_accountant.epsilon_worst"] for r in rows[1:]]
    assert 0 < eps[0] < eps[1] and all(r["loss"] == r["loss"] for r in rows)  # increasing, loss not NaN
