"""Client-level DP: clipping, adaptive clip norm, Gaussian noise on the mean, distributed
noise shares, config-time refusals, and a tiny run that resumes bit-identically."""

from __future__ import annotations

import json

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from fedfm.aggregators.clip import clip_payload, dp_clip_payload, l2_norm
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Update
from fedfm.privacy.accounting import Plan, epsilon
from fedfm.privacy.clipping import DpClip, DpClipParams, adapted_norm, update_noise_multiplier
from fedfm.privacy.distributed import DpClientNoise, DpClientNoiseParams
from fedfm.privacy.noise import DpNoise, DpNoiseParams, PrivacyBudgetSpent
from fedfm.runtime import LocalRuntime
from fedfm.runtime.outputs import read_metrics


def ctx_for(exp, rnd=1, seed=0):
    """The round's context as the loop builds it: the run's plan, no workbench."""
    from fedfm.core.protocols import RoundContext
    from fedfm.privacy.plan import plan_of

    return RoundContext(rnd, seed, torch.Generator().manual_seed(seed), exp.federation.clients, rounds=exp.rounds,
                        sample_size=plan_of(exp).sample_size)


def dp_exp(tmp_path, **over):
    steps = over.pop("steps", [{"name": "dp_clip", "clip_norm": 1.0}, {"name": "dp_noise", "noise_multiplier": 1.0}])
    return from_dict(tiny_config(tmp_path, server_steps=steps, **over))


def upd(cid, **tensors):
    return Update(cid=cid, payload={k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}, num_examples=10 + cid)


def test_clipped_norms_never_exceed_c_and_weights_are_uniform(tmp_path):
    exp = dp_exp(tmp_path)
    g = torch.Generator().manual_seed(1)
    ups = [Update(i, {"a": torch.randn(50, generator=g) * (i + 1), "b": torch.randn(3, 4, generator=g)}, 5 + i) for i in range(20)]
    out, state, m = DpClip(DpClipParams(clip_norm=1.5))(ups, ctx_for(exp), {})
    assert all(l2_norm(u.payload) <= 1.5 for u in out)
    assert [u.num_examples for u in out] == [1] * 20
    assert state == {} and m["clip_norm"] == 1.5
    # an update already inside the ball is untouched: (0.3, 0.4) has norm 0.5
    small, _, m = DpClip(DpClipParams(clip_norm=1.0))([upd(0, a=[0.3, 0.4])], ctx_for(exp), {})
    assert torch.equal(small[0].payload["a"], torch.tensor([0.3, 0.4])) and m["clipped"] == 0


def test_dp_clipping_stays_within_c_in_bf16_and_refuses_integer_tensors(tmp_path):
    # (3, 4) in bf16, C = 1: scaled by 0.2 and rounded to 8 significant bits, (0.6, 0.8) becomes
    # (154/256, 205/256), norm sqrt(65741/65536) = 1.00156 > C. The DP clipping shrinks until the
    # stored values are inside: (152/256, 203/256), norm sqrt(64313/65536) = 0.99063.
    naive, _ = clip_payload({"a": torch.tensor([3.0, 4.0], dtype=torch.bfloat16)}, 1.0)
    assert naive["a"].tolist() == [154 / 256, 205 / 256] and l2_norm(naive) > 1.0
    out, norm = dp_clip_payload({"a": torch.tensor([3.0, 4.0], dtype=torch.bfloat16)}, 1.0, "test")
    assert norm == 5.0 and out["a"].dtype == torch.bfloat16 and out["a"].tolist() == [152 / 256, 203 / 256]
    assert l2_norm(out) == pytest.approx(math.sqrt(64313 / 65536), abs=1e-12) and l2_norm(out) <= 1.0
    exp = dp_exp(tmp_path)
    g = torch.Generator().manual_seed(2)
    ups = [Update(i, {"a": (torch.randn(300, generator=g) * 3).bfloat16(), "b": torch.randn(7, generator=g).half()}, 1)
           for i in range(30)]
    clipped, _, _ = DpClip(DpClipParams(clip_norm=1.0))(ups, ctx_for(exp), {})
    assert all(l2_norm(u.payload) <= 1.0 for u in clipped) and all(u.payload["a"].dtype == torch.bfloat16 for u in clipped)
    bad = Update(3, {"a": torch.ones(2), "count": torch.tensor([7])}, 1)
    with pytest.raises(ValueError, match="dp_clip: client 3: tensor 'count' has dtype torch.int64"):
        DpClip(DpClipParams(clip_norm=1.0))([bad], ctx_for(exp), {})
    mw = DpClientNoise(DpClientNoiseParams(clip_norm=1.0, noise_multiplier=1.0, clients_per_round=2))
    with pytest.raises(ValueError, match="dp_client_noise: client 3: tensor 'count' has dtype torch.int64"):
        mw.after_train(bad, SimpleNamespace(seed=1, round=1, cid=3))


def test_adaptive_clip_norm_follows_andrew_et_al(tmp_path):
    # norms 0.5, 2, 3, 0.2 against C = 1: two unclipped of four -> fraction 0.5.
    # target 0.25, lr 0.2: C' = 1 * exp(-0.2 * (0.5 - 0.25)) = exp(-0.05) = 0.951229...
    nxt, frac = adapted_norm(1.0, 2, 4, 0.0, 0.25, 0.2)
    assert frac == 0.5 and nxt == pytest.approx(math.exp(-0.05), abs=1e-12)
    exp = dp_exp(tmp_path)
    ups = [upd(0, a=[0.3, 0.4]), upd(1, a=[2.0, 0.0]), upd(2, a=[0.0, 3.0]), upd(3, a=[0.2, 0.0])]
    step = DpClip(DpClipParams(clip_norm=1.0, target_quantile=0.25, count_noise=1e-9))
    _, state, m = step(ups, ctx_for(exp), {})
    assert float(state["clip_norm"]) == pytest.approx(math.exp(-0.05), abs=1e-8)
    _, state2, m2 = step(ups, ctx_for(exp), state)  # the next round clips with the adapted norm
    assert m2["clip_norm"] == pytest.approx(math.exp(-0.05), abs=1e-8)
    # the exact statistics (outside epsilon): 2 of 4 clipped, mean norm (0.5 + 2 + 3 + 0.2) / 4 = 1.425;
    # report_exact: false leaves them out and keeps the mechanism's outputs
    assert m["clipped"] == 2 and m["mean_norm"] == pytest.approx(1.425, abs=1e-7)
    quiet = DpClip(DpClipParams(clip_norm=1.0, target_quantile=0.25, count_noise=1e-9, report_exact=False))
    _, state3, m3 = quiet(ups, ctx_for(exp), {})
    assert set(m3) == {"clip_norm", "next_clip_norm", "noised_unclipped_fraction"}
    assert torch.equal(state3["clip_norm"], state["clip_norm"])
    # Andrew et al. Thm 1: sigma = 1, sigma_b = 1 -> sigma_Delta = (1 - 1/4)^-1/2 = 1.1547
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75))
    with pytest.raises(ValueError, match="count_noise"):
        update_noise_multiplier(1.0, 0.4)


def test_central_noise_on_the_mean_has_std_sigma_c_over_n(tmp_path):
    # sigma 1.5, C 2, n 4 clients -> std on the mean 1.5 * 2 / 4 = 0.75 (= 3.0 on the sum / 4)
    exp = dp_exp(tmp_path)
    ctx = ctx_for(exp, seed=3)
    ctx.notes = {"clip_norm": 2.0, "n": 4, "count_noise": None}
    delta = {"w": torch.zeros(400, 500), "b": torch.zeros(10)}
    noised, state, m = DpNoise(DpNoiseParams(noise_multiplier=1.5))(delta, ctx, {})
    std = float(noised["w"].double().std())
    assert abs(std - 0.75) < 0.75 * 0.01  # 200,000 draws: relative error of the std ~ 0.16%
    assert abs(float(noised["w"].double().mean())) < 0.01
    assert m["noise_std"] == 0.75 and m["delta"] == 1e-5
    # one round of 1 of 2 clients... here every client is sampled (q = 1): plain Gaussian
    assert m["epsilon"] == pytest.approx(epsilon(Plan(2, 2), [1.5], 1e-5))
    assert state["sigmas"].tolist() == [1.5]
    ctx2 = ctx_for(exp, seed=3)
    ctx2.notes = dict(ctx.notes)
    again, _, _ = DpNoise(DpNoiseParams(noise_multiplier=1.5))(delta, ctx2, {})
    assert torch.equal(again["w"], noised["w"])  # same (seed, round) generator, same noise


def test_distributed_shares_sum_to_sigma_c(tmp_path):
    # m = 4 clients, sigma 2, C 1: each share has std 2 * 1 / sqrt(4) = 1, the sum of 4 has std 2.
    p = DpClientNoiseParams(clip_norm=1.0, noise_multiplier=2.0, clients_per_round=4)
    mw = DpClientNoise(p)
    total = torch.zeros(100_000, dtype=torch.float64)
    for cid in range(4):
        u = Update(cid, {"w": torch.zeros(100_000)}, 30)
        out = mw.after_train(u, SimpleNamespace(seed=1000 + cid, round=1, cid=cid))
        assert out.num_examples == 1
        assert abs(float(out.payload["w"].double().std()) - 1.0) < 0.01
        total += out.payload["w"].double()
    assert abs(float(total.std()) - 2.0) < 0.02
    # the server side charges sigma * sqrt(n / m): 3 of 4 arrived -> 2 * sqrt(3/4) = 1.7320
    exp = from_dict(tiny_config(tmp_path, **{
        "federation.clients": 4,
        "federation.roles": [{"name": "all", "fraction": 1.0, "middleware": [{"name": "dp_client_noise", **p.model_dump()}]}],
        "server_steps": [{"name": "dp_noise", "mode": "distributed", "noise_multiplier": 2.0}]}))
    step = DpNoise(DpNoiseParams(mode="distributed", noise_multiplier=2.0))
    assert step.stage == "updates"
    _, state, m = step([Update(i, {"w": torch.zeros(2)}, 1) for i in range(3)], ctx_for(exp), {})
    assert m["accounted_noise_multiplier"] == pytest.approx(math.sqrt(3.0))


def test_config_time_refusals(tmp_path):
    with pytest.raises(ConfigError, match="privacy budget is spent"):
        dp_exp(tmp_path, rounds=50, steps=[{"name": "dp_clip", "clip_norm": 1.0},
                                           {"name": "dp_noise", "noise_multiplier": 0.5, "max_epsilon": 1.0}])
    with pytest.raises(ConfigError, match="PLD accountant has no fixed-size"):
        dp_exp(tmp_path, **{"federation.clients": 4, "federation.clients_per_round": 2},
               steps=[{"name": "dp_clip", "clip_norm": 1.0}, {"name": "dp_noise", "noise_multiplier": 1.0, "accountant": "pld"}])
    with pytest.raises(ConfigError, match="sensitivity of the mean"):
        dp_exp(tmp_path, **{"aggregator.rule": "median"})
    with pytest.raises(ConfigError, match="needs a dp_clip step before it"):
        dp_exp(tmp_path, steps=[{"name": "dp_noise", "noise_multiplier": 1.0}])
    with pytest.raises(ConfigError, match="dp_client_noise on every client"):
        dp_exp(tmp_path, steps=[{"name": "dp_noise", "mode": "distributed", "noise_multiplier": 1.0}])
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        dp_exp(tmp_path, steps=[{"name": "dp_clip", "clip_norm": 1.0}, {"name": "dp_noise"}])


def test_budget_spent_mid_run_stops(tmp_path):
    exp = dp_exp(tmp_path)
    ctx = ctx_for(exp)
    ctx.notes = {"clip_norm": 1.0, "n": 2, "count_noise": None}
    eps1 = epsilon(Plan(2, 2), [1.0], 1e-5)
    step = DpNoise(DpNoiseParams(noise_multiplier=1.0, max_epsilon=eps1 * 1.2))  # 1 round: 4.73; 2 rounds: 7.08 > 5.67
    _, state, _ = step({"w": torch.zeros(3)}, ctx, {})
    with pytest.raises(PrivacyBudgetSpent, match="budget is spent"):
        step({"w": torch.zeros(3)}, ctx, state)


@pytest.mark.parametrize("key", [None, "k" * 32])
def test_tiny_run_writes_epsilon_and_resumes_bit_identically(tmp_path, monkeypatch, key):
    # with FEDFM_DP_NOISE_KEY set the noise is keyed, and a resumed run with the same key is still bit-identical
    if key is None:
        monkeypatch.delenv("FEDFM_DP_NOISE_KEY", raising=False)
    else:
        monkeypatch.setenv("FEDFM_DP_NOISE_KEY", key)
    over = {"federation.clients": 3, "federation.clients_per_round": 2, "train.epochs": 1, "runtime.threads": 1,
            "federation.partitioner": {"name": "iid"}}
    steps = [{"name": "dp_clip", "clip_norm": 0.5, "target_quantile": 0.5, "count_noise": 1.0},
             {"name": "dp_noise", "noise_multiplier": 0.8}]
    full = LocalRuntime(from_dict(tiny_config(tmp_path, rounds=3, server_steps=steps, **over)), tmp_path / "full")
    full.run()
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    eps = [r["dp_noise.epsilon"] for r in rows[1:]]
    plan = Plan(3, 2)
    assert eps == pytest.approx([epsilon(plan, [0.8] * r, 1e-5) for r in (1, 2, 3)])
    assert eps[0] < eps[1] < eps[2] and all(r["dp_noise.delta"] == 1e-5 for r in rows[1:])
    assert rows[1]["dp_clip.clip_norm"] == 0.5 and rows[2]["dp_clip.clip_norm"] != 0.5  # adapted
    assert all(r["dp_noise.noise"] == ("seeded" if key is None else "keyed") for r in rows[1:])
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["privacy"] == {"dp_noise.epsilon": eps[-1], "dp_noise.delta": 1e-5,
                                  "dp_noise.noise": "seeded" if key is None else "keyed"}
    # 2 rounds, then resume to 3: the same final state, bit for bit
    LocalRuntime(from_dict(tiny_config(tmp_path, rounds=2, server_steps=steps, **over)), tmp_path / "part").run()
    part = LocalRuntime(from_dict(tiny_config(tmp_path, rounds=3, server_steps=steps, **over)), tmp_path / "part", resume=True)
    part.run()
    for k, v in full.final_state.items():
        assert torch.equal(v, part.final_state[k]), k
    assert read_metrics(tmp_path / "part" / "metrics.jsonl")[-1]["dp_noise.epsilon"] == eps[-1]


def test_privacy_example_configs_load():
    from pathlib import Path

    from fedfm.config import load_config

    configs = sorted((Path(__file__).parent.parent / "examples" / "privacy").glob("*.yaml"))
    # client DP (2), sample DP, distributed DP, SecAgg, SecAgg+, SecAgg + distributed DP, node authentication
    assert len(configs) == 8
    for path in configs:
        exp = load_config(path)
        assert exp.server_steps or exp.exchanges or exp.runtime.flower.nodes, path


def test_a_round_without_the_run_plan_cannot_be_accounted():
    from fedfm.core.protocols import RoundContext
    from fedfm.privacy.plan import round_plan

    bare = RoundContext(1, 0, torch.Generator(), 10)  # a context no run built: rounds and sample size unknown
    with pytest.raises(RuntimeError, match="dp_noise: the round context carries no run plan"):
        round_plan(bare, "dp_noise")
    plan = round_plan(RoundContext(1, 0, torch.Generator(), 10, rounds=3, sample_size=4), "dp_noise", "pld")
    assert (plan.population, plan.sample_size, plan.accountant) == (10, 4, "pld")
