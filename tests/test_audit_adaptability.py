"""Bad input to the adaptability components, refused before training with the client,
role and field named."""

from __future__ import annotations

import pytest

from fedfm.config import ConfigError, from_dict
from tests.conftest import tiny_config


def refusal(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    return " ".join(str(err.value).split())


def roles(*clusters, key="cluster"):
    return [{"name": f"r{c}", "cids": [c], "profile": {key: v}} for c, v in enumerate(clusters)]


def test_ifca_refuses_more_cluster_models_than_clients(tmp_path):
    # 2 clients can train at most 2 of K = 3 models.
    raw = tiny_config(tmp_path, learner={"name": "ifca", "k": 3})
    assert "learner ifca: k=3 cluster models but only 2 clients (federation.clients)" in refusal(raw)
    assert from_dict(tiny_config(tmp_path, learner={"name": "ifca", "k": 2})).learner.name == "ifca"


def test_ifca_profile_clusters_are_checked_for_every_client(tmp_path):
    ifca = {"name": "ifca", "k": 2, "assign": "profile"}
    # cluster index 2 with K = 2: client 1, role 'r1'
    raw = tiny_config(tmp_path, learner=ifca, **{"federation.roles": roles(0, 2)})
    assert "client 1 (of role 'r1') has profile.cluster 2; it needs an integer in 0..1 (learner.k=2)" in refusal(raw)
    # client 1 in no role: no cluster at all
    raw = tiny_config(tmp_path, learner=ifca, **{"federation.roles": roles(1)})
    assert "client 1 (in no role of federation.roles) has no profile.cluster" in refusal(raw)
    # no roles: client 0 is the first without one
    assert "client 0 (in no role of federation.roles) has no profile.cluster" in refusal(tiny_config(tmp_path, learner=ifca))
    # another profile_key is the one looked for
    raw = tiny_config(tmp_path, learner={**ifca, "profile_key": "family"}, **{"federation.roles": roles(0, 1)})
    assert "client 0 (of role 'r0') has no profile.family" in refusal(raw)
    ok = tiny_config(tmp_path, learner={**ifca, "profile_key": "family"}, **{"federation.roles": roles(1, 0, key="family")})
    assert from_dict(ok).learner.params()["profile_key"] == "family"


def test_fedapt_refuses_clients_that_no_role_gives_a_domain(tmp_path):
    # 3 clients, one role of 2 (cids 0 and 2): client 1 would fail in every round.
    over = {"peft": {"method": "fedapt", "num_virtual_tokens": 2, "num_domains": 2}, "learner": {"name": "fedapt"},
            "federation.clients": 3}
    raw = tiny_config(tmp_path, **over, **{"federation.roles": [{"name": "a", "cids": [0, 2], "profile": {"domain": 1}}]})
    msg = refusal(raw)
    assert "learner fedapt: client(s) [1] are in no role of federation.roles and have no profile.domain" in msg
    assert "every client needs one in 0..1 (the roles cover 2 of 3 clients)" in msg
    raw["federation"]["roles"].append({"name": "b", "cids": [1], "profile": {"domain": 0}})
    assert from_dict(raw).learner.name == "fedapt"


def test_feddat_refuses_personal_adapters_that_would_be_averaged(tmp_path):
    raw = tiny_config(tmp_path, peft={"method": "dual_adapter"}, learner={"name": "feddat"})
    assert "learner feddat: peft.local is empty, so the personal adapters would travel and be averaged" in refusal(raw)
    raw["peft"]["local"] = ["*.personal.*"]
    assert from_dict(raw).peft.local == ["*.personal.*"]


def test_fedbfpt_refuses_more_local_layers_than_the_model_has_before_training(tmp_path):
    # The tiny model has num_hidden_layers 2 (model.config_overrides): L_k = 3 cannot be built.
    over = {"model.task": "masked_lm", "peft": {"method": "full"}, "rounds": 1}
    raw = tiny_config(tmp_path, learner={"name": "fedbfpt", "rounds": 1, "local_layers": 3}, **over)
    assert "learner fedbfpt: local_layers 3 exceeds the model's 2 transformer layers" in refusal(raw)
    ok = tiny_config(tmp_path, learner={"name": "fedbfpt", "rounds": 1, "local_layers": 2}, **over)
    assert from_dict(ok).learner.params()["local_layers"] == 2


def test_a_stages_file_whose_first_init_from_is_missing_or_unfinished_is_refused_first(tmp_path):
    import yaml

    from fedfm.stages import load_stages

    first = tiny_config(tmp_path, peft={"method": "full"})
    unfinished = tmp_path / "unfinished"  # a run folder without final.safetensors
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("{}")
    for start, missing in ((tmp_path / "nope", tmp_path / "nope"), (unfinished, unfinished / "final.safetensors")):
        first["model"]["init_from"] = str(start)
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"stages": [{"name": "a", "config": first}, {"name": "b", "config": tiny_config(tmp_path)}]}))
        with pytest.raises(ConfigError) as err:
            load_stages(path, tmp_path / "out")
        assert f"stage 'a' (stages.0 of {path}): model.init_from: no final State at {missing}" in str(err.value)
    assert not (tmp_path / "out").exists()
