"""Client-profile keys: registered by the rooms that read them, named by config fields, or refused."""

from __future__ import annotations

import pytest
from conftest import tiny_config
from pydantic import BaseModel

from fedfm.config import ConfigError, from_dict
from fedfm.core.profile_keys import named_profile_keys, profile_key_field, profile_key_problems, profile_keys, register_profile_key
from fedfm.runtime.capacity import PROFILE_KEYS


def _raw(tmp_path, profile: dict, **over) -> dict:
    return tiny_config(tmp_path, **{"federation.roles": [{"name": "phone", "count": 1, "profile": profile}], **over})


def test_every_key_a_room_reads_is_registered_with_its_help():
    import fedfm.components  # noqa: F401  (every room imported, as a config load does)

    keys = profile_keys()
    assert set(PROFILE_KEYS) | {"density", "domain"} <= set(keys)
    assert all(keys.values())


def test_a_misspelt_key_names_the_role_the_key_and_the_close_match(tmp_path):
    with pytest.raises(ConfigError) as err:
        from_dict(_raw(tmp_path, {"capcity": 0.5}), "<test>")
    msg = str(err.value)
    assert "federation.roles 'phone': unknown profile key 'capcity'; did you mean 'capacity'?" in msg
    assert "Known profile keys: bandwidth_mbps, capacity, cut, density, domain," in msg
    with pytest.raises(ConfigError, match=r"'phone': unknown profile key 'zzz'\. Known profile keys"):
        from_dict(_raw(tmp_path, {"zzz": 1}), "<test>")


def test_a_key_the_config_names_passes_there_only(tmp_path):
    step = [{"name": "cluster_report", "source": "updates", "k": 2, "truth_profile": "language"}]
    exp = from_dict(_raw(tmp_path, {"language": 1}, server_steps=step), "<test>")
    assert exp.federation.roles[0].profile == {"language": 1}
    with pytest.raises(ConfigError, match=r"unknown profile key 'language'"):
        from_dict(_raw(tmp_path, {"language": 1}), "<test>")
    # ifca reads the cluster from its profile_key ("cluster" by default), for every client
    both = lambda profile: {"federation.roles": [{"name": "phone", "count": 2, "profile": profile}]}  # noqa: E731
    from_dict(_raw(tmp_path, {}, learner={"name": "ifca", "assign": "profile"}, **both({"cluster": 1})), "<test>")
    from_dict(_raw(tmp_path, {}, learner={"name": "ifca", "assign": "profile", "profile_key": "family"}, **both({"family": 1})), "<test>")


def test_role_is_set_by_the_runtime(tmp_path):
    with pytest.raises(ConfigError, match=r"'phone': profile.role is set to the role's name by the runtime"):
        from_dict(_raw(tmp_path, {"role": "tablet"}), "<test>")


def test_a_plugin_registers_its_own_key(tmp_path):
    plugin = tmp_path / "battery.py"
    plugin.write_text("from fedfm.core.profile_keys import register_profile_key\n"
                      "register_profile_key('battery_pct', 'share of battery left')\n")
    exp = from_dict(_raw(tmp_path, {"battery_pct": 40}, plugins=[str(plugin)]), "<test>")
    assert exp.federation.roles[0].profile == {"battery_pct": 40}


def test_named_keys_and_problems_by_hand():
    class Params(BaseModel):
        truth: str | None = profile_key_field(None, "a key")
        many: list[str] = profile_key_field([], "keys")
        other: str = "speed"  # not marked: names nothing

    named = named_profile_keys([("server_steps[0]", Params(truth="lang", many=["a", "b"])), ("learner", Params())])
    assert named == {"lang": "server_steps[0].truth", "a": "server_steps[0].many", "b": "server_steps[0].many"}

    class Role:
        name, profile = "r", {"lang": 0, "rank": 2, "lnag": 1}

    import fedfm.runtime.capacity  # noqa: F401  (registers rank)

    [problem] = profile_key_problems([Role], named)
    assert problem.startswith("federation.roles 'r': unknown profile key 'lnag'; did you mean 'lang'?")


def test_fedfm_list_profile_shows_every_key_with_its_meaning(monkeypatch):
    from conftest import invoke

    result, text = invoke(monkeypatch, "list")
    assert result.exit_code == 0 and "federation.roles[].profile (keys, `fedfm list profile`): bandwidth_mbps, " in text
    result, text = invoke(monkeypatch, "list", "profile")
    assert result.exit_code == 0, text
    assert "│ rank │ LoRA rank, 1..peft.r (hetlora, flexlora) │" in text
    assert "│ density │ flash: the client's own share of prunable entries, at most learner.density │" in text


def test_a_key_no_setting_of_the_run_reads_is_named(tmp_path):
    from fedfm.core.profile_keys import unread_profile_keys

    roles = {"federation.roles": [{"name": "phone", "count": 1, "profile": {"rank": 2, "speed": 0.5, "memory_mb": 512}},
                                  {"name": "laptop", "count": 1, "profile": {"rank": 4}}]}
    # learner local reads no rank; no sim_clock step reads speed; memory_mb declares no reader
    exp = from_dict(tiny_config(tmp_path, **roles), "<test>")
    assert unread_profile_keys(exp) == [
        "federation.roles 'phone', 'laptop': profile.rank is read only with learner.name hetlora or flexlora; this run ignores it",
        "federation.roles 'phone': profile.speed is read only with server_steps sim_clock; this run ignores it",
    ]
    exp = from_dict(tiny_config(tmp_path, learner={"name": "hetlora"}, server_steps=[{"name": "sim_clock"}], **roles), "<test>")
    assert unread_profile_keys(exp) == []


def test_check_warns_of_an_unread_key(tmp_path, monkeypatch):
    import yaml

    from conftest import invoke

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, {"layers": 1})))
    result, text = invoke(monkeypatch, "check", str(path))
    assert result.exit_code == 0, text
    assert "warning: federation.roles 'phone': profile.layers is read only with learner.name fedra; this run ignores it" in text


def test_a_reader_must_name_a_setting():
    with pytest.raises(ValueError, match=r"register_profile_key 'x': read_by entries are '<config path>=<value>', got 'fedra'"):
        register_profile_key("x", "a key", ("fedra",))
    assert "x" not in profile_keys()  # nothing registered


def test_no_example_sets_a_key_it_does_not_read():
    from pathlib import Path

    from fedfm.config import load_config
    from fedfm.core.profile_keys import unread_profile_keys

    root = Path(__file__).resolve().parents[1] / "examples"
    found = {str(p.relative_to(root)): unread_profile_keys(load_config(p))
             for p in sorted(root.rglob("*.yaml")) if "profile:" in p.read_text()}
    assert len(found) >= 10 and all(lines == [] for lines in found.values()), found
