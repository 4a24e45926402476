"""Client-profile keys: registered by the rooms that read them, named by config fields, or refused."""

from __future__ import annotations

import pytest
from conftest import tiny_config
from pydantic import BaseModel

from fedfm.config import ConfigError, from_dict
from fedfm.core.profile_keys import named_profile_keys, profile_key_field, profile_key_problems, profile_keys
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
