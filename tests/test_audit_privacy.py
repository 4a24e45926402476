"""Privacy features under out-of-range and contradictory settings: refused before training
with the field and the numbers."""

from __future__ import annotations

import pytest

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict

SECAGG = {"name": "secagg", "bound": 8.0}


@pytest.mark.parametrize("p", [1.5, -0.1])
def test_secagg_dropout_probability_outside_0_1_is_refused(tmp_path, p):
    raw = tiny_config(tmp_path, exchanges=[{**SECAGG, "dropout": {"unmask": p}}])
    with pytest.raises(ConfigError, match=r"exchanges\[0\].dropout.unmask: Input should be"):
        from_dict(raw)


def test_secagg_drop_of_clients_or_rounds_that_do_not_exist_is_refused(tmp_path):
    # 2 clients (ids 0..1): client 9 never runs, round 0 is the evaluation before training
    raw = tiny_config(tmp_path, exchanges=[{**SECAGG, "drop": [{"phase": "train", "cids": [1, 9], "rounds": [0, 1]}]}])
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert r"exchanges[0] (secagg): drop[0].cids [9] outside 0..1 (federation.clients 2)" in str(err.value)
    assert r"drop[0].rounds [0]: rounds count from 1" in str(err.value)
    from_dict(tiny_config(tmp_path, exchanges=[{**SECAGG, "drop": [{"phase": "train", "cids": [1], "rounds": [1, 7]}]}]))


def test_secagg_of_one_client_is_refused(tmp_path):
    raw = tiny_config(tmp_path, **{"federation.clients_per_round": 1, "exchanges": [SECAGG]})
    with pytest.raises(ConfigError, match=r"exchanges\[0\] \(secagg\): 1 client per round: the sum of one client's input is that input"):
        from_dict(raw)
    raw = tiny_config(tmp_path, exchanges=[{**SECAGG, "threshold": 1}])
    with pytest.raises(ConfigError, match=r"threshold 1 lets a round end with one survivor"):
        from_dict(raw)


def test_default_threshold_never_lets_one_client_through():
    from fedfm.privacy.secagg import default_threshold

    # n - floor(n/3): 2 -> 2, 3 -> 2, 9 -> 6; a round keyed with 1 client needs 2 and fails
    assert [default_threshold(n) for n in (1, 2, 3, 9)] == [2, 2, 2, 6]
