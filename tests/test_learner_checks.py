"""Config-time checks of learner settings (fedfm.learners.checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfm.config import ConfigError, from_dict, load_config
from fedfm.learners.checks import scaffold_config_problem

from conftest import tiny_config


def exp_with(tmp_path, learner: dict, **train):
    raw = tiny_config(tmp_path, learner=learner)
    raw["train"].update(train)
    return from_dict(raw)


def test_scaffold_option2_with_adamw_is_refused_at_config_time_with_the_reason(tmp_path):
    raw = tiny_config(tmp_path, learner={"name": "scaffold", "control_update": "delta"})
    raw["train"]["optimizer"] = "adamw"
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    for words in ("learner.control_update: 'delta'", "adamw", "(x - y)/(K lr)", "mean_grad"):
        assert words in str(err.value), words
    # The same check on its own (a config built without validation).
    exp = from_dict(tiny_config(tmp_path, learner={"name": "scaffold"}))
    exp.learner = type(exp.learner)(name="scaffold", control_update="delta")
    assert "(the default)" not in scaffold_config_problem(exp)


def test_scaffold_option2_with_sgd_momentum_is_refused(tmp_path):
    exp = exp_with(tmp_path, {"name": "scaffold"}, optimizer="sgd", momentum=0.9)
    exp.learner = type(exp.learner)(name="scaffold", control_update="delta")
    problem = scaffold_config_problem(exp)
    for words in ("train.momentum 0.9", "6.05 instead of 1", "mean_grad"):
        assert words in problem, words
    assert scaffold_config_problem(exp_with(tmp_path, {"name": "scaffold"}, optimizer="sgd", momentum=0.9)) is None  # mean_grad


def test_scaffold_defaults_to_the_working_variant(tmp_path):
    exp = exp_with(tmp_path, {"name": "scaffold"}, optimizer="adamw")
    assert scaffold_config_problem(exp) is None


@pytest.mark.parametrize(
    "learner, optimizer",
    [
        ({"name": "scaffold", "control_update": "mean_grad"}, "adamw"),
        ({"name": "scaffold", "control_update": "mean_grad"}, "sgd"),
        ({"name": "scaffold", "control_update": "delta"}, "sgd"),  # option II is the paper's setting under plain SGD
        ({"name": "local"}, "adamw"),
        ({"name": "feddyn"}, "adamw"),
    ],
)
def test_working_settings_pass(tmp_path, learner, optimizer):
    assert scaffold_config_problem(exp_with(tmp_path, learner, optimizer=optimizer)) is None


def test_every_example_config_passes():
    root = Path(__file__).resolve().parents[1] / "examples"
    paths = sorted(root.rglob("*.yaml"))
    assert any(p.name == "scaffold.yaml" for p in paths)
    from fedfm.stages import is_stages_file, load_stages

    for path in paths:
        exps = [s.exp for s in load_stages(path, "runs/x")[1]] if is_stages_file(path) else [load_config(path)]
        for exp in exps:
            assert scaffold_config_problem(exp) is None, path
