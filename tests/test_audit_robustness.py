"""Attacks and robust rules under settings that cannot work: refused before training with
the field, role and numbers, or, where only a run can tell, a clear error naming the client."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import tiny_config
from fedfm.attacks.backdoor import Backdoor, BackdoorParams
from fedfm.attacks.label_flip import LabelFlip, LabelFlipParams
from fedfm.config import ConfigError, from_dict


def test_omniscient_step_with_a_role_nobody_has_is_refused(tmp_path):
    raw = tiny_config(tmp_path, **{"federation.clients": 4, "federation.roles": [{"name": "attacker", "count": 1}],
                                   "server_steps": [{"name": "alie", "role": "atacker"}]})
    with pytest.raises(ConfigError, match=r"server_steps\[0\] \(alie\): role 'atacker' is not a role of federation.roles \(roles: attacker\)"):
        from_dict(raw)


def test_alie_with_a_majority_of_attackers_in_every_round_is_refused(tmp_path):
    # every client every round: n = 4, f = 3, s = floor(4/2 + 1) - 3 = 0: z_max undefined
    raw = tiny_config(tmp_path, **{"federation.clients": 4, "attack": {"name": "alie", "count": 3}})
    with pytest.raises(ConfigError, match=r"3 attackers of the 4 clients .* \(s = floor\(4/2 \+ 1\) - 3 = 0"):
        from_dict(raw)
    # n = 4, f = 2: s = 1, z_max = Phi^-1(3/4) is defined: accepted
    from_dict(tiny_config(tmp_path, **{"federation.clients": 4, "attack": {"name": "alie", "count": 2}}))
    # z given: every round is attacked, accepted
    from_dict(tiny_config(tmp_path, **{"federation.clients": 4, "attack": {"name": "alie", "count": 3, "z": 1.0}}))
    # 3 of 8 clients, 4 sampled per round: a majority only by chance, accepted
    from_dict(tiny_config(tmp_path, **{"federation.clients": 8, "federation.clients_per_round": 4,
                                       "attack": {"name": "alie", "count": 3}}))


def test_ipm_with_every_client_an_attacker_is_refused(tmp_path):
    raw = tiny_config(tmp_path, **{"federation.clients": 4, "attack": {"name": "ipm", "count": 4}})
    with pytest.raises(ConfigError, match="all 4 clients of every round have role 'attacker': no honest update"):
        from_dict(raw)


@pytest.mark.parametrize("attack", [{"name": "backdoor", "target": 2}, {"name": "label_flip", "target": 5}])
def test_attack_target_outside_the_classes_is_refused(tmp_path, attack):
    raw = tiny_config(tmp_path, **{"federation.clients": 4, "attack": {**attack, "count": 1}})
    with pytest.raises(ConfigError, match=rf"role 'attacker' middleware\[0\] \({attack['name']}\): target {attack['target']} "
                                          r"is not a class of the model \(model.num_labels 2: classes 0..1\)"):
        from_dict(raw)


def test_backdoor_asr_target_outside_the_classes_is_refused(tmp_path):
    raw = tiny_config(tmp_path, **{"server_steps": [{"name": "backdoor_asr", "target": 3}]})
    with pytest.raises(ConfigError, match=r"server_steps\[0\] \(backdoor_asr\): target 3 is not a class"):
        from_dict(raw)


def test_target_outside_the_classes_names_the_client_when_num_labels_is_inferred():
    # model.num_labels unset at config time: the client middleware refuses it, naming the client
    ctx = SimpleNamespace(cid=3, seed=0, model=SimpleNamespace(config=SimpleNamespace(num_labels=2)), tokenizer=None)
    examples = [{"input_ids": [101, 7, 102], "label": 0}]
    with pytest.raises(ValueError, match=r"client 3: label_flip.target 2 is not a class of the model \(num_labels 2: classes 0..1\)"):
        LabelFlip(LabelFlipParams(target=2)).before_train(examples, ctx)
    with pytest.raises(ValueError, match=r"client 3: backdoor.target 2 is not a class"):
        Backdoor(BackdoorParams(target=2)).before_train(examples, ctx)


@pytest.mark.parametrize(
    "over, need",
    [
        ({"aggregator": {"rule": "krum", "f": 1}, "federation.clients": 5}, 4),  # n - f - 2 >= 1: f + 3
        ({"aggregator": {"rule": "multi_krum", "f": 0, "m": 4}, "federation.clients": 6}, 4),  # m averaged
        ({"aggregator": {"rule": "trimmed_mean", "beta": 0.4}, "federation.clients": 5}, 1),  # 2 floor(0.4 r) < r
    ],
)
def test_dropouts_that_can_shrink_a_round_are_accepted_the_loop_holds_the_rule_minimum(tmp_path, over, need):
    from fedfm.aggregators.robust_checks import fewest_updates

    exp = from_dict(tiny_config(tmp_path, **{"faults.dropout": 0.3, **over}))  # smaller rounds: retried or skipped
    assert fewest_updates(exp.aggregator.rule, exp.aggregator.params(), exp.federation.clients) == need


def test_krum_round_too_small_names_min_clients():
    import torch

    from fedfm.aggregators.krum import krum_scores

    with pytest.raises(ValueError, match=r"krum: 3 updates with f=1 leaves n - f - 2 = 0 neighbours.*federation.min_clients: 4"):
        krum_scores(torch.zeros(3, 2), 1)


def test_krum_run_with_dropouts_and_min_clients_skips_the_small_round(tmp_path):
    import json

    from fedfm.runtime import LocalRuntime

    raw = tiny_config(tmp_path, **{"federation.clients": 5, "federation.min_clients": 4, "faults.dropout": 0.5,
                                   "aggregator": {"rule": "krum", "f": 1}, "rounds": 2, "train.epochs": 1})
    LocalRuntime(from_dict(raw), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    # seed 0: round 1 never keeps 4 of 5 in its 4 attempts (skipped, model unchanged); round 2
    # keeps 4 on its 3rd attempt and Krum (f=1: 4 - 1 - 2 = 1 neighbour each) aggregates them
    assert rows[0]["skipped"] == "1 of min_clients 4 kept after 4 attempt(s)" and rows[0]["clients"] == []
    assert rows[1]["skipped"] is None and len(rows[1]["clients"]) == 4 and rows[1]["attempts"] == 3
