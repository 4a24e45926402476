"""Bad input to the heterogeneous-client features: refused before training, with the role
or client named."""

from __future__ import annotations

import pytest
import torch

from fedfm.config import ConfigError, from_dict
from fedfm.runtime.capacity import client_who, profile_problems

from conftest import tiny_config


def roles_raw(tmp_path, profile: dict, learner: str = "hetlora", **over):
    return tiny_config(
        tmp_path,
        **{
            "federation.clients": 3,
            "federation.roles": [{"name": "phone", "count": 3, "profile": profile}],
            "peft.r": 8,
            "learner": {"name": learner},
            "server_steps": [{"name": "sim_clock"}],
            **over,
        },
    )


def test_profile_values_refused_at_config_time_with_the_role(tmp_path):
    # speed 0 and a negative bandwidth used to pass the check and stop the run in round 1,
    # after the evaluation of round 0; capacity 1.5 was caught only on the model
    with pytest.raises(ConfigError) as info:
        from_dict(roles_raw(tmp_path, {"speed": 0, "bandwidth_mbps": -1, "capacity": 1.5, "memory_mb": float("nan")}))
    text = str(info.value)
    assert "federation.roles 'phone': profile.speed must be a positive number, got 0" in text
    assert "federation.roles 'phone': profile.bandwidth_mbps must be a positive number, got -1" in text
    assert "federation.roles 'phone': profile.capacity must be in (0, 1], got 1.5" in text
    assert "federation.roles 'phone': profile.memory_mb must be a positive number, got nan" in text
    with pytest.raises(ConfigError, match=r"federation.roles 'phone': profile.layers must be an integer >= 1, got 0"):
        from_dict(roles_raw(tmp_path, {"layers": 0}, "fedra"))
    with pytest.raises(ConfigError, match=r"federation.roles 'phone': profile.cut must be an integer >= 1, got 1.5"):
        from_dict(roles_raw(tmp_path, {"cut": 1.5}, "split"))


def test_profile_problems_by_hand():
    assert profile_problems({"rank": 2, "capacity": 1, "speed": 0.25, "up_mbps": 5}, "r") == []
    assert profile_problems({"rank": 0}, "r") == ["r: profile.rank must be an integer >= 1, got 0"]
    assert profile_problems({"rank": 0}, "r", skip=("rank",)) == []  # the rank learners check it against peft.r
    assert profile_problems({"down_mbps": True}, "r") == ["r: profile.down_mbps must be a positive number, got True"]
    assert client_who(3, {"role": "phone"}) == "client 3 (role 'phone')" and client_who(3, {}) == "client 3"


def test_fedra_layers_past_the_model_refused_by_the_reference(tmp_path):
    # the check asks every client's reference on the meta model: FedRA's now resolves the
    # layer count there, so `fedfm check` refuses what `fedfm run` met only after round 0
    from fedfm.aggregators.fedra import FedRAServer

    shared = {f"bert.encoder.layer.{i}.attention.self.query.lora_A.weight": torch.zeros(2, 4) for i in range(2)}
    part = FedRAServer(None, 3)
    assert part.client_reference(0, {"layers": 2, "role": "phone"}, shared) is shared
    with pytest.raises(ValueError, match=r"client 0 \(role 'phone'\): profile.layers = 3 exceeds the model's 2"):
        part.client_reference(0, {"layers": 3, "role": "phone"}, shared)


def test_sim_clock_server_seconds_per_step_replaces_the_measured_server_time():
    """SplitFed reports server_s (measured); given 0.5 s per step, 4 steps cost 2.0 s, unscaled by speed:
    compute = 4 * 0.25 / 0.5 + 2.0 = 4.0."""
    import torch

    from fedfm.aggregators.sim_clock import timing_of
    from fedfm.core.types import Update
    from fedfm.runtime.capacity import client_seconds

    update = Update(cid=3, num_examples=8, payload={"w": torch.zeros(2)},
                    metrics={"steps": 4, "step_s": 9.0, "server_s": 0.123})
    measured = timing_of(update, {"speed": 0.5}, 0.25)
    fixed = timing_of(update, {"speed": 0.5}, 0.25, server_seconds_per_step=0.5)
    assert measured.server_s == 0.123 and fixed.server_s == 2.0
    assert client_seconds(fixed)["compute"] == 4.0
    plain = Update(cid=4, num_examples=8, payload={"w": torch.zeros(2)}, metrics={"steps": 4})
    assert timing_of(plain, {}, 0.25, server_seconds_per_step=0.5).server_s == 0.0  # no split learning: nothing added
