"""The DP plan `fedfm check` and `fedfm run` print before training (privacy/outlook.py),
and the warning when the noise on each round's mean exceeds the norm of any clipped update."""

from __future__ import annotations

import re

from conftest import tiny_config

from fedfm.config import from_dict
from fedfm.privacy.outlook import dp_outlook


def _exp(tmp_path, noise: dict, **over):
    steps = [{"name": "dp_clip", "clip_norm": 0.5}, {"name": "dp_noise", "delta": 1e-5, **noise}]
    return from_dict(tiny_config(tmp_path, server_steps=steps, **{"federation.clients": 8, **over}))


def test_the_plan_line_of_a_solved_target(tmp_path):
    # one round of all 8 clients under PLD: sigma 1.0813 for epsilon 4 (the analytic Gaussian
    # mechanism's, tests/test_privacy_accounting.py), and those rounds spend epsilon 4
    lines, warnings = dp_outlook(_exp(tmp_path, {"target_epsilon": 4.0, "accountant": "pld"}, rounds=1))
    assert len(lines) == 1 and warnings == []
    assert re.fullmatch(r"server_steps\[1\] \(dp_noise, central\): noise_multiplier 1\.08[01] \(solved for target_epsilon "
                        r"4\.0\), 8 of 8 clients per round, 1 round\(s\): epsilon (4|3\.99\d*) at delta 1e-05 \(pld\)", lines[0])


def test_noise_above_the_clients_per_round_is_warned(tmp_path):
    # sigma 10 over 4 clients per round: std 10 / 4 = 2.5 clip norms on every coordinate of the mean
    lines, warnings = dp_outlook(_exp(tmp_path, {"noise_multiplier": 10.0}, **{"federation.clients_per_round": 4}))
    assert lines[0].startswith("server_steps[1] (dp_noise, central): noise_multiplier 10 (given), 4 of 8 clients per round, 2 round(s)")
    assert len(warnings) == 1 and "adds noise of std 2.5 x the clip norm to every coordinate" in warnings[0]
    # sigma 4 over 4: std exactly one clip norm, not above it
    _, warnings = dp_outlook(_exp(tmp_path, {"noise_multiplier": 4.0}, **{"federation.clients_per_round": 4}))
    assert warnings == []


def test_no_dp_noise_step_no_outlook(tmp_path):
    assert dp_outlook(from_dict(tiny_config(tmp_path))) == ([], [])
