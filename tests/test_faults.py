"""Faults: dropout, stragglers against a deadline, client exceptions; a 50% dropout run."""

from __future__ import annotations

import pytest

from fedfm.config import from_dict
from fedfm.runtime import LocalRuntime
from fedfm.runtime.faults import client_speed, drops_out, judge_client, simulated_seconds
from fedfm.runtime.outputs import read_metrics


def faults_exp(tmp_path, **over):
    from conftest import tiny_config

    return from_dict(tiny_config(tmp_path, **over))


def test_simulated_time_and_deadline(tmp_path):
    assert simulated_seconds(10, 2.0, 0.5) == 40.0  # 10 steps * 2 s / speed 0.5
    exp = faults_exp(
        tmp_path,
        **{"faults.stragglers": {"profile": "tiers", "speeds": [0.5], "seconds_per_step": 1.0, "deadline_s": 15}},
    )
    assert client_speed(exp.faults.stragglers, 0, 3) == 0.5
    v = judge_client(exp.faults, 0, 1, 0, 3, steps=10)  # 10 / 0.5 = 20 s > 15 s
    assert v.sim_seconds == 20.0 and v.reason.startswith("straggler: 20.0s")
    assert judge_client(exp.faults, 0, 1, 0, 3, steps=7).reason is None  # 14 s <= 15 s


def test_speed_profiles(tmp_path):
    exp = faults_exp(tmp_path, **{"faults.stragglers": {"profile": "uniform", "low": 0.2, "high": 0.4}})
    speeds = [client_speed(exp.faults.stragglers, 7, c) for c in range(200)]
    assert all(0.2 <= s <= 0.4 for s in speeds)
    assert speeds == [client_speed(exp.faults.stragglers, 7, c) for c in range(200)]  # fixed per client
    tiers = faults_exp(tmp_path, **{"faults.stragglers": {"profile": "tiers", "speeds": [1.0, 0.1], "weights": [3, 1]}})
    drawn = [client_speed(tiers.faults.stragglers, 0, c) for c in range(2000)]
    assert set(drawn) == {1.0, 0.1} and abs(drawn.count(0.1) / 2000 - 0.25) < 0.04
    assert client_speed(faults_exp(tmp_path).faults.stragglers, 0, 5) == 1.0


def test_dropout_probability():
    assert not any(drops_out(0.0, 0, 1, 0, c) for c in range(100))
    assert all(drops_out(1.0, 0, 1, 0, c) for c in range(100))
    rate = sum(drops_out(0.5, 0, 1, 0, c) for c in range(2000)) / 2000
    assert abs(rate - 0.5) < 0.04
    assert [drops_out(0.5, 0, 1, 0, c) for c in range(50)] == [drops_out(0.5, 0, 1, 0, c) for c in range(50)]


def test_run_with_half_dropout_and_a_failing_client_completes(tmp_path):
    exp = faults_exp(
        tmp_path,
        rounds=3,
        **{"federation.clients": 4, "faults.dropout": 0.5, "federation.min_clients": 1, "train.steps": 2},
    )
    rt = LocalRuntime(exp, tmp_path / "run")
    original = rt.algo.local_update

    def local_update(inst, ctx):
        if inst.cid == 2:
            raise RuntimeError("out of memory on client 2")
        return original(inst, ctx)

    rt.algo.local_update = local_update
    summary = rt.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    n_dropped = 0
    for r in rows[1:]:
        last = r["attempts"] - 1
        expected = [c for c in range(4) if drops_out(0.5, exp.seed, r["round"], last, c)]
        this_try = [d for d in r["dropped"] if d.get("attempt", 0) == last]
        assert [d["cid"] for d in this_try] == expected
        assert all(d["reason"] == "dropout" for d in r["dropped"])
        failed = [f["cid"] for f in r["failed"] if f.get("attempt", 0) == last]
        assert failed == ([2] if 2 not in expected else [])
        assert all("out of memory on client 2" in f["error"] for f in r["failed"])
        assert r["clients"] == [c for c in range(4) if c not in expected and c != 2]
        assert len(r["clients"]) >= 1 and r["skipped"] is None
        n_dropped += len(r["dropped"])
    assert n_dropped > 0 and summary["dropped"] == n_dropped


@pytest.mark.parametrize("policy", ["skip", "retry"])
def test_too_few_clients_is_never_aggregated(tmp_path, policy):
    exp = faults_exp(
        tmp_path,
        rounds=1,
        **{"faults.dropout": 1.0, "federation.on_too_few": policy, "federation.max_retries": 2, "train.steps": 1},
    )
    rt = LocalRuntime(exp, tmp_path / policy)
    initial = rt.wb.initial_state()
    rt.run()
    row = read_metrics(tmp_path / policy / "metrics.jsonl")[1]
    assert row["clients"] == [] and row["skipped"].startswith("0 of min_clients 1")
    assert row["attempts"] == (3 if policy == "retry" else 1)
    assert len(row["dropped"]) == 2 * row["attempts"]
    for k, t in initial.items():
        assert torch_equal(rt.final_state[k], t)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_the_dropout_outlook_by_hand(tmp_path):
    from conftest import tiny_config

    from fedfm.runtime.fault_outlook import attempt_keeps, dropout_outlook

    assert attempt_keeps(8, 8, 0.2) == pytest.approx(0.8 ** 8)  # FedBPT: every sampled client must stay
    assert attempt_keeps(4, 2, 0.5) == pytest.approx(11 / 16)  # (C(4,2) + C(4,3) + C(4,4)) / 2^4
    # 2 clients, min_clients 2, dropout 0.5: an attempt keeps both with 0.25; 4 attempts all fail with 0.75^4
    raw = tiny_config(tmp_path, **{"faults.dropout": 0.5, "federation.min_clients": 2})
    assert dropout_outlook(from_dict(raw)) == [
        "faults.dropout 0.5: a round needs 2 of its 2 sampled clients (min_clients 2); an attempt keeps that many with "
        "probability 0.250, so with federation.max_retries 3 a round is skipped with probability 0.316 (about 0.6 of 2 "
        "rounds), from random dropout alone"]
    # min_clients 1: 1 - 0.5^2 = 0.75 an attempt, 0.25^4 = 0.004 a round: below the 0.05 that warns
    assert dropout_outlook(from_dict(tiny_config(tmp_path, **{"faults.dropout": 0.5}))) == []


def test_the_outlook_counts_secure_aggregations_phase_dropout_by_hand(tmp_path):
    from conftest import tiny_config

    from fedfm.privacy.secagg.params import SecAggParams, dropout_stages
    from fedfm.runtime.fault_outlook import attempt_keeps, chain_keeps, dropout_outlook

    assert chain_keeps(4, 2, 0.5, lambda n: []) == pytest.approx(attempt_keeps(4, 2, 0.5)) == pytest.approx(11 / 16)
    # large federations do not overflow (C(2000, 1000) is far above a float's range): the
    # tail of Binomial(2000, 0.7) at 1,500 is 3.97e-07, and 1,000 sampled clients are fast
    assert attempt_keeps(2000, 1500, 0.3) == pytest.approx(3.9715e-07, rel=1e-3)
    assert 0.999 < chain_keeps(1000, 1, 0.1, lambda n: dropout_stages(SecAggParams(bound=1.0, dropout={"unmask": 0.05}), n)) <= 1.0
    stages = lambda n: dropout_stages(SecAggParams(bound=1.0), n)  # noqa: E731
    # 3 sampled, dropout 0.5; t = max(2, n - n // 3) = 2 for n = 2 or 3: P(n >= 2) = 4/8
    assert chain_keeps(3, 1, 0.5, stages) == pytest.approx(0.5)
    # and half of the masked inputs lost in train: n=3 (1/8) keeps 2 of 3 with 1/2, n=2 (3/8) both with 1/4
    stages = lambda n: dropout_stages(SecAggParams(bound=1.0, dropout={"train": 0.5}), n)  # noqa: E731
    assert chain_keeps(3, 1, 0.5, stages) == pytest.approx(1 / 8 * 1 / 2 + 3 / 8 * 1 / 4)
    # need 3 (min_clients) is checked after train: only n=3 and all 3 masked: 1/8 * 1/8
    assert chain_keeps(3, 3, 0.5, stages) == pytest.approx(1 / 64)
    # the run: 2 clients, no faults.dropout, unmask dropout 0.5: t = 2, so both must answer: 1/4 an attempt
    secagg = [{"name": "secagg", "bound": 1.0, "dropout": {"unmask": 0.5}}]
    assert dropout_outlook(from_dict(tiny_config(tmp_path, exchanges=secagg))) == [
        "the per-phase dropout of exchanges[0] (secagg): a round needs 1 of its 2 sampled clients (min_clients 1) and "
        "every phase's threshold; an attempt keeps that many with probability 0.250, so with federation.max_retries 3 "
        "a round is skipped with probability 0.316 (about 0.6 of 2 rounds), from random dropout alone"]
    secagg[0]["dropout"] = {"unmask": 0.01}  # 0.98 an attempt: no warning
    assert dropout_outlook(from_dict(tiny_config(tmp_path, exchanges=secagg))) == []
    # no per-phase dropout, faults.dropout 0.5: min_clients 1 alone would keep an attempt with
    # 1 - 0.25 = 0.75, but t = 2 of 2 needs both: 0.25 an attempt, 0.75^4 = 0.316 a round
    plain = [{"name": "secagg", "bound": 1.0}]
    assert dropout_outlook(from_dict(tiny_config(tmp_path, exchanges=plain, **{"faults.dropout": 0.5}))) == [
        "faults.dropout 0.5: a round needs 1 of its 2 sampled clients (min_clients 1) and every phase's threshold; an "
        "attempt keeps that many with probability 0.250, so with federation.max_retries 3 a round is skipped with "
        "probability 0.316 (about 0.6 of 2 rounds), from random dropout alone"]
