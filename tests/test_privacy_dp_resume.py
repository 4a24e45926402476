"""target_epsilon fixes sigma for the whole run: solved once for the run's plan, recorded in
dp_noise's checkpointed state, reused by every later round (a resumed run's included), and
a resume that changes ``rounds`` is refused instead of spending more than the target."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedfm.config import from_dict
from fedfm.core.protocols import RoundContext
from fedfm.privacy.accounting import Plan, epsilon, solve_noise_multiplier
from fedfm.privacy.noise import DpNoise, DpNoiseParams, PlanChanged
from fedfm.runtime import LocalRuntime
from fedfm.runtime.checkpoint import Checkpointer
from fedfm.runtime.outputs import read_metrics

TARGET = {"name": "dp_noise", "target_epsilon": 8.0}
STEPS = [{"name": "dp_clip", "clip_norm": 0.5}, TARGET]
# 3 clients, 2 sampled per round: the plan (rounds, 3, 2)
OVER = {"federation.clients": 3, "federation.clients_per_round": 2, "train.epochs": 1, "runtime.threads": 1,
        "federation.partitioner": {"name": "iid"}}


def ctx(rounds: int, rnd: int = 1) -> RoundContext:
    c = RoundContext(rnd, 0, torch.Generator().manual_seed(0), 3, rounds=rounds, sample_size=2)
    c.notes = {"clip_norm": 1.0, "n": 2, "count_noise": None}
    return c


def test_target_epsilon_is_solved_once_recorded_and_reused():
    step = DpNoise(DpNoiseParams(target_epsilon=8.0))
    _, state, m = step({"w": torch.zeros(3)}, ctx(rounds=1), {})
    sigma = solve_noise_multiplier(Plan(3, 2), 1, 8.0, 1e-5)
    assert state["plan"].tolist() == [1, 3, 2] and state["plan"].dtype == torch.int64
    assert state["planned_sigma"].tolist() == [sigma] and m["noise_multiplier"] == sigma
    assert m["epsilon"] <= 8.0 + 1e-9
    # the recorded value is what later rounds use, not a new solution
    state = {**state, "planned_sigma": torch.tensor([2.5], dtype=torch.float64)}
    _, again, m2 = step({"w": torch.zeros(3)}, ctx(rounds=1, rnd=2), state)
    assert m2["noise_multiplier"] == 2.5 and again["sigmas"].tolist() == [sigma, 2.5]
    assert again["planned_sigma"].tolist() == [2.5] and again["plan"].tolist() == [1, 3, 2]


def test_a_changed_rounds_is_refused_naming_the_recorded_plan():
    step = DpNoise(DpNoiseParams(target_epsilon=8.0))
    _, state, _ = step({"w": torch.zeros(3)}, ctx(rounds=1), {})
    sigma = float(state["planned_sigma"][0])
    three = epsilon(Plan(3, 2), [sigma] * 3, 1e-5)  # what 3 rounds of the 1-round sigma would spend
    assert three > 8.0
    with pytest.raises(PlanChanged) as err:
        step({"w": torch.zeros(3)}, ctx(rounds=3, rnd=2), state)
    msg = str(err.value)
    assert "target_epsilon 8.0 was solved for the recorded plan of rounds 1 (2 of 3 clients per round)" in msg
    assert f"noise_multiplier {sigma:.4f}" in msg and "this run asks for rounds 3" in msg
    assert f"would end at epsilon {three:.3f}, not 8.0" in msg and "resume with rounds: 1" in msg
    # fewer rounds than recorded: refused too (the run would not be the one its noise was solved for)
    _, state3, _ = step({"w": torch.zeros(3)}, ctx(rounds=3), {})
    with pytest.raises(PlanChanged, match="recorded plan of rounds 3 .* asks for rounds 2"):
        step({"w": torch.zeros(3)}, ctx(rounds=2, rnd=2), state3)


def test_a_given_noise_multiplier_records_no_plan():
    step = DpNoise(DpNoiseParams(noise_multiplier=1.0))
    _, state, _ = step({"w": torch.zeros(3)}, ctx(rounds=1), {})
    assert set(state) == {"sigmas"}
    _, state, _ = step({"w": torch.zeros(3)}, ctx(rounds=5, rnd=2), state)  # rounds may grow: sigma is fixed anyway
    assert state["sigmas"].tolist() == [1.0, 1.0]


def test_resume_to_more_rounds_with_target_epsilon_is_refused(tmp_path):
    LocalRuntime(from_dict(tiny_config(tmp_path, rounds=1, server_steps=STEPS, **OVER)), tmp_path / "run").run()
    longer = LocalRuntime(from_dict(tiny_config(tmp_path, rounds=3, server_steps=STEPS, **OVER)), tmp_path / "run", resume=True)
    with pytest.raises(PlanChanged, match="recorded plan of rounds 1 .* asks for rounds 3"):
        longer.run()
    # nothing of the refused round was applied or written
    assert Checkpointer(tmp_path / "run").rounds() == [1]
    assert [r["round"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1]


class Interrupted(Exception):
    pass


def test_an_interrupted_target_epsilon_run_resumes_bit_identically(tmp_path, monkeypatch):
    cfg = lambda: from_dict(tiny_config(tmp_path, rounds=3, server_steps=STEPS, **OVER))  # noqa: E731
    full = LocalRuntime(cfg(), tmp_path / "full")
    full.run()
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")[1:]
    sigma = solve_noise_multiplier(Plan(3, 2), 3, 8.0, 1e-5)
    assert [r["dp_noise.noise_multiplier"] for r in rows] == [sigma] * 3
    assert rows[-1]["dp_noise.epsilon"] == pytest.approx(epsilon(Plan(3, 2), [sigma] * 3, 1e-5))
    assert rows[-1]["dp_noise.epsilon"] <= 8.0 + 1e-9

    # the same run, stopped at round 2's aggregation (after round 1's checkpoint), then resumed
    call = DpNoise.__call__

    def stop_in_round_2(self, value, c, state):
        if c.round == 2:
            raise Interrupted
        return call(self, value, c, state)

    monkeypatch.setattr(DpNoise, "__call__", stop_in_round_2)
    with pytest.raises(Interrupted):
        LocalRuntime(cfg(), tmp_path / "part").run()
    monkeypatch.setattr(DpNoise, "__call__", call)
    assert Checkpointer(tmp_path / "part").rounds() == [1]
    part = LocalRuntime(cfg(), tmp_path / "part", resume=True)
    part.run()
    for k, v in full.final_state.items():
        assert torch.equal(v, part.final_state[k]), k
    resumed = read_metrics(tmp_path / "part" / "metrics.jsonl")[1:]
    assert [r["dp_noise.epsilon"] for r in resumed] == [r["dp_noise.epsilon"] for r in rows]
