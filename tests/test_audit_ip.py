"""IP protection under bad input: missing keys, runs without a watermark, wrong folders."""

from __future__ import annotations

import pytest
import yaml

from conftest import invoke, tiny_config

UNSET = "FEDFM_AUDIT_UNSET_KEY"


@pytest.mark.parametrize(
    "spec, where",
    [
        ({"name": "waffle", "key_env": UNSET}, "server_steps waffle"),
        ({"name": "client_watermark", "key_env": UNSET}, "server_steps client_watermark"),
        ({"name": "client_watermark", "key": "m", "owner_key_env": UNSET}, "server_steps client_watermark owner"),
    ],
)
def test_a_missing_key_variable_stops_the_step_when_it_is_built(monkeypatch, spec, where):
    import fedfm.ip  # noqa: F401  (registers the steps)
    from fedfm.aggregators import Pipeline

    monkeypatch.delenv(UNSET, raising=False)
    with pytest.raises(ValueError, match=f"{where}: environment variable {UNSET} \\(key_env\\) is not set"):
        Pipeline.from_specs([spec])


def test_check_and_run_refuse_a_missing_key_before_any_round(tmp_path, monkeypatch):
    monkeypatch.delenv(UNSET, raising=False)
    raw = tiny_config(tmp_path, rounds=1, server_steps=[{"name": "waffle", "key_env": UNSET, "trigger_size": 20}])
    cfg = tmp_path / "wm.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    for command in (["check", str(cfg)], ["run", str(cfg), "--out", str(tmp_path / "out")]):
        result, out = invoke(monkeypatch, *command)
        assert result.exit_code != 0, out
        assert f"environment variable {UNSET} (key_env) is not set or empty" in out
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
