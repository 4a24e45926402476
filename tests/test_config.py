"""Config validation: errors name the key and fail before anything loads."""

from __future__ import annotations

import pytest
import yaml

from conftest import tiny_config
from fedfm.config import ConfigError, apply_overrides, from_dict, load_config


def test_quickstart_example_validates():
    exp = load_config("examples/quickstart.yaml")
    assert exp.peft.method == "lora" and exp.peft.params()["r"] == 8
    assert exp.federation.clients == 8 and exp.federation.examples_per_client == 250


def test_dotted_overrides_change_values(tiny):
    exp = from_dict(tiny, overrides=["train.lr=1e-3", "federation.clients=3", "peft.r=2"])
    assert exp.train.lr == pytest.approx(1e-3)
    assert exp.federation.clients == 3
    assert exp.peft.params()["r"] == 2


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=1", "train.lrr: Extra inputs are not permitted"),
        ("train.lr=fast", "train.lr: Input should be a valid number"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("peft.r=0", "peft.r: Input should be greater than or equal to 1"),
        ("peft.rank=4", "peft.rank: Extra inputs are not permitted"),
        ("peft.method=lorax", "peft.method: unknown name 'lorax'"),
        ("aggregator.rule=mean", "aggregator.rule: unknown name 'mean'"),
        ("federation.clients_per_round=9", "clients_per_round (9) exceeds clients"),
        ("federation.partitioner.alpha=0", "federation.partitioner: unknown"),
        ("rounds=0", "rounds: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_key(tiny, override, needle):
    if override.startswith("federation.partitioner.alpha"):
        tiny["federation"]["partitioner"] = {"name": "dirichlet"}
        override, needle = "federation.partitioner.alpha=0", "federation.partitioner.alpha: Input should be greater than 0"
    with pytest.raises(ConfigError) as err:
        from_dict(tiny, overrides=[override])
    assert needle in str(err.value)


def test_model_needs_exactly_one_source(tiny):
    tiny["model"]["path"] = "/somewhere"
    with pytest.raises(ConfigError, match="exactly one of model.package or model.path"):
        from_dict(tiny)


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match="rounds is not a section"):
        apply_overrides({"rounds": 3}, ["rounds.x=1"])


def test_override_names_a_list_item_by_its_index():
    raw = {"server_steps": [{"name": "a", "max_steps": 200}, {"name": "b", "max_steps": 200}], "peft": {"target_modules": ["query", "value"]}}
    out = apply_overrides(raw, ["server_steps.1.max_steps=20", "peft.target_modules.0=key"])
    assert out["server_steps"] == [{"name": "a", "max_steps": 200}, {"name": "b", "max_steps": 20}]
    assert out["peft"]["target_modules"] == ["key", "value"] and raw["server_steps"][1]["max_steps"] == 200  # a copy
    for bad in ("server_steps.2.max_steps=1", "server_steps.first.max_steps=1"):
        with pytest.raises(ConfigError, match=r"server_steps is a list of 2 item\(s\); name one by its index: server_steps.0 to server_steps.1"):
            apply_overrides(raw, [bad])
    with pytest.raises(ConfigError, match=r"peft.target_modules.0 is not a section"):
        apply_overrides(raw, ["peft.target_modules.0.x=1"])
    with pytest.raises(ConfigError, match="server_steps is an empty list"):
        apply_overrides({"server_steps": []}, ["server_steps.0.name=x"])


def test_an_invalid_list_item_override_is_blamed_on_it(tmp_path):
    waffle = {"name": "waffle", "key": "k", "trigger_size": 24}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, **{"model.num_labels": 2, "server_steps": [waffle]})))
    with pytest.raises(ConfigError) as err:
        load_config(cfg, ["server_steps.0.max_steps=-1"])
    assert "invalid override -o server_steps.0.max_steps=-1" in str(err.value)
    assert "server_steps[0].max_steps: Input should be greater than or equal to 0 (from -o server_steps.0.max_steps=-1)" in str(err.value)
    assert load_config(cfg, ["server_steps.0.max_steps=7"]).server_steps[0]["max_steps"] == 7


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_more_clients_than_groups_fails_before_the_model_loads(tmp_path, tiny, model_builds):
    from fedfm.runtime import Workbench

    exp = from_dict(tiny, overrides=["federation.clients=50"])
    with pytest.raises(ValueError, match="federation.clients=50 exceeds the"):
        Workbench(exp)
    assert model_builds["models"] == 0


def test_a_repeated_key_a_binary_file_and_a_yaml_error_are_named_with_the_file(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("rounds: 3\npeft: {method: lora, r: 8}\nrounds: 4\n")  # PyYAML alone keeps rounds: 4
    with pytest.raises(ConfigError, match=r"key 'rounds' appears twice in one mapping \(lines 1 and 3\); keep one"):
        load_config(cfg)
    cfg.write_text("train:\n  lr: 1.0e-3\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice in one mapping \(lines 2 and 3\)"):
        load_config(cfg)
    cfg.write_bytes(b"\xff\xfe rounds: 3\n")
    with pytest.raises(ConfigError, match=r"job.yaml is not UTF-8 text \(byte 0xff at offset 0\)"):
        load_config(cfg)
    cfg.write_text("rounds: [\n")
    with pytest.raises(ConfigError, match=r'not valid YAML(.|\n)*in ".*job.yaml", line 2'):
        load_config(cfg)


def test_merge_keys_may_override_what_they_merge(tmp_path):
    from fedfm.config_file import read_yaml

    cfg = tmp_path / "anchors.yaml"
    cfg.write_text("base: &b {lr: 1.0e-3, epochs: 1}\ntrain:\n  <<: *b\n  lr: 3.0e-3\n")
    assert read_yaml(cfg)["train"] == {"lr": 3.0e-3, "epochs": 1}


def test_a_misspelt_key_gets_the_closest_allowed_one(tmp_path):
    raw = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"train.lrr: Extra inputs are not permitted; did you mean 'lr'\? \(from -o train.lrr=1\)"):
        from_dict(raw, overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"peft.rr: Extra inputs are not permitted; did you mean 'r'\?"):  # a registry's params
        from_dict(raw, overrides=["peft.rr=4"])
    with pytest.raises(ConfigError, match=r"aggregator.bta: Extra inputs are not permitted; did you mean 'beta'\?"):
        from_dict(raw, overrides=["aggregator.rule=trimmed_mean", "aggregator.bta=0.1"])
    with pytest.raises(ConfigError, match=r"server.zzz: Extra inputs are not permitted; allowed: check_fingerprint, "):
        from_dict(raw, overrides=["server.zzz=1"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["federation.clients=4", "federation.clients_per_round=1", "federation.min_clients=2"],
         "min_clients (2) exceeds the 1 clients sampled per round (clients_per_round 1)"),
        # ceil(0.25 * 8) = 2 sampled, 3 required
        (["federation.clients=8", "federation.fraction=0.25", "federation.min_clients=3"],
         "min_clients (3) exceeds the 2 clients sampled per round (ceil(fraction 0.25 x 8 clients))"),
    ],
)
def test_min_clients_above_the_clients_sampled_per_round_is_refused(tiny, overrides, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(tiny, overrides=overrides)
    assert "federation: " in str(err.value) and needle in str(err.value)
    assert "so every round would be skipped" in str(err.value)
    # exactly the clients sampled per round is fine: 2 of ceil(0.25 * 8) = 2
    exp = from_dict(tiny, overrides=["federation.clients=8", "federation.fraction=0.25", "federation.min_clients=2"])
    assert exp.federation.min_clients == 2
