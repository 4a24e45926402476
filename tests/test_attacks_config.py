"""The ``attack:`` config section expands into a role (and, for omniscient attacks, a
server step placed first); a tiny federated run with an attack and a defense."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.runtime import LocalRuntime


def test_attack_section_becomes_a_role_with_middleware(tmp_path):
    exp = from_dict(tiny_config(tmp_path, **{"federation.clients": 5, "attack": {"name": "sign_flip", "scale": 2.0}}))
    (role,) = exp.federation.roles
    assert role.name == "attacker" and role.fraction == 0.2 and role.middleware == [{"name": "sign_flip", "scale": 2.0}]
    assert "attack" not in exp.dump()  # consumed: the roles are the one truth


def test_omniscient_attack_becomes_the_first_server_step(tmp_path):
    raw = tiny_config(tmp_path, **{"attack": {"name": "alie", "count": 1}, "server_steps": [{"name": "norm_bound", "max_norm": 1.0}]})
    exp = from_dict(raw)
    assert exp.server_steps == [{"name": "alie", "role": "attacker"}, {"name": "norm_bound", "max_norm": 1.0}]
    assert exp.federation.roles[0].count == 1 and exp.federation.roles[0].middleware == []


@pytest.mark.parametrize(
    "attack, message",
    [
        ({"name": "nope"}, "unknown attack 'nope'"),
        ({"name": "sign_flip", "fraction": 0.2, "count": 1}, "at most one of fraction, count, cids"),
        ({"name": "sign_flip", "sclae": 2}, "sclae"),
        ({"name": "alie", "z": "big"}, "server_steps\\[0\\].z"),
    ],
)
def test_bad_attack_sections_fail_before_training(tmp_path, attack, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(tiny_config(tmp_path, attack=attack))


def test_tiny_run_with_alie_and_fedfa(tmp_path):
    # 5 clients, one ALIE attacker (role drawn by seed), Fed-FA-inspired filter with the
    # Fisher on synthetic sequences; 2 rounds.
    raw = tiny_config(
        tmp_path,
        **{
            "federation.clients": 5,
            "train.epochs": 1,
            "attack": {"name": "alie", "count": 1},
            "server_steps": [{"name": "fedfa", "synthetic": 4, "length": 8}],
        },
    )
    from fedfm.aggregators import fedfa

    seen = []
    real = fedfa.synthetic_fisher
    fedfa.synthetic_fisher = lambda wb, model, *a: seen.append({k: v.clone() for k, v in model.items()}) or real(wb, model, *a)
    try:
        rt = LocalRuntime(from_dict(raw), tmp_path / "run")
        models = []
        real_round = rt.loop._aggregate
        rt.loop._aggregate = lambda rnd, attempt, ss, *a: models.append(dict(ss["model"])) or real_round(rnd, attempt, ss, *a)
        rt.run()
    finally:
        fedfa.synthetic_fisher = real
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["alie.attackers"] == 1 and "fedfa.discarded" in rows[1]
    # the Fisher of each round is taken at the model that round started from (RoundContext.model)
    assert len(seen) == len(models) == 2
    assert all(torch.equal(s[k], m[k]) for s, m in zip(seen, models) for k in s)


def test_every_robustness_example_validates():
    from pathlib import Path

    from fedfm.config import load_config

    files = sorted((Path(__file__).resolve().parents[1] / "examples" / "robustness").glob("*.yaml"))
    assert len(files) >= 11
    for f in files:
        exp = load_config(f)
        if f.stem == "compromised_base":  # no attacker clients: the base model is planted
            assert exp.federation.roles == [] and exp.model.path and exp.server_steps[-1]["name"] == "backdoor_asr"
            continue
        assert exp.name == f.stem and exp.federation.roles[0].name == "attacker"
