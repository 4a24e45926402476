"""FedKSeed (uniform and Pro) and FedBPT refuse, before training, an aggregation rule or a
server step their server half would ignore or that would break the model clients rebuild."""

from __future__ import annotations

import pytest

from fedfm.config import ConfigError, from_dict
from fedfm.learners.zo_checks import MEASURING, zeroth_order_config_problems

from conftest import tiny_config

LEARNERS = {
    "fedkseed": ({"method": "full"}, {"name": "fedkseed", "num_seeds": 16, "steps": 3}),
    "fedkseed-pro": ({"method": "full"}, {"name": "fedkseed", "num_seeds": 16, "steps": 3, "seed_sampling": "score"}),
    "fedbpt": ({"method": "prompt_tuning", "num_virtual_tokens": 4}, {"name": "fedbpt", "dim": 8}),
}


def raw_for(tmp_path, label, **over):
    raw = tiny_config(tmp_path, **over)
    raw["peft"], raw["learner"] = LEARNERS[label]
    raw.setdefault("server_steps", [{"name": "non_state_payload"}])
    return raw


@pytest.mark.parametrize("label", list(LEARNERS))
def test_the_plain_config_passes(tmp_path, label):
    assert zeroth_order_config_problems(from_dict(raw_for(tmp_path, label))) == []


def with_steps(exp, *names, **params):
    return exp.model_copy(update={"server_steps": [{"name": n, **params.get(n, {})} for n in names]})


@pytest.mark.parametrize("label", list(LEARNERS))
def test_a_rule_other_than_fedavg_is_refused_with_the_field(tmp_path, label):
    exp = from_dict(raw_for(tmp_path, label))
    exp = exp.model_copy(update={"aggregator": exp.aggregator.model_copy(update={"rule": "median"})})
    problems = zeroth_order_config_problems(exp)
    assert len(problems) == 1
    assert problems[0].startswith("aggregator.rule: learner ") and "supports only fedavg (got median)" in problems[0]
    assert "silently ignore" in problems[0]


@pytest.mark.parametrize("label", list(LEARNERS))
def test_dp_steps_after_the_payload_step_are_refused(tmp_path, label):
    exp = with_steps(from_dict(raw_for(tmp_path, label)), "non_state_payload", "dp_clip", "dp_noise",
                     dp_clip={"clip_norm": 1.0}, dp_noise={"noise_multiplier": 1.0})
    problems = zeroth_order_config_problems(exp)
    assert len(problems) == 1 and problems[0].startswith("server_steps: learner ")
    assert "does not support ['dp_clip', 'dp_noise']" in problems[0]
    assert "differ from the one clients rebuild" in problems[0] and "guarantee it does not give" in problems[0]


def test_the_config_is_refused_before_any_training(tmp_path):
    raw = raw_for(tmp_path, "fedkseed-pro")
    raw["aggregator"] = {"rule": "median"}
    raw["server_steps"] = [{"name": "non_state_payload"}, {"name": "dp_clip", "clip_norm": 1.0}]
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert "aggregator.rule: learner fedkseed supports only fedavg" in str(err.value)
    assert "server_steps: learner fedkseed does not support ['dp_clip']" in str(err.value)


def test_each_registered_step_is_refused_unless_it_only_measures(tmp_path):
    from fedfm.aggregators.pipeline import server_steps

    names = [n for n in server_steps.names() if n != "non_state_payload"]
    assert MEASURING == ("backdoor_asr",) and "backdoor_asr" in names and "dp_clip" in names
    base = from_dict(raw_for(tmp_path, "fedkseed"))
    for name in names:
        problems = zeroth_order_config_problems(with_steps(base, "non_state_payload", name))
        assert (problems == []) == (name in MEASURING), (name, problems)


def test_the_payload_step_must_come_first(tmp_path):
    exp = with_steps(from_dict(raw_for(tmp_path, "fedbpt")), "backdoor_asr", "non_state_payload")
    problems = zeroth_order_config_problems(exp)
    assert len(problems) == 2 and "list {name: non_state_payload} first" in problems[0]
    assert "does not support ['non_state_payload']" in problems[1]


def test_fedbpt_needs_two_clients_per_round(tmp_path):
    exp = from_dict(raw_for(tmp_path, "fedbpt"))
    one = exp.model_copy(update={"federation": exp.federation.model_copy(update={"clients_per_round": 1})})
    problems = zeroth_order_config_problems(one)
    assert len(problems) == 1 and problems[0].startswith("federation: learner fedbpt samples 1 client per round")
    assert "needs at least 2" in problems[0]
