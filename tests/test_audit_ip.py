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


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A run folder without a watermark: config.yaml and the untrained final.safetensors."""
    from safetensors.torch import save_file

    from fedfm.config import from_dict
    from fedfm.ip.loading import build_base

    tmp = tmp_path_factory.mktemp("plain")
    raw = tiny_config(tmp)
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(from_dict(raw).dump()))
    _, template = build_base(from_dict(raw))
    save_file({k: v.contiguous() for k, v in template.items()}, str(run / "final.safetensors"))
    return run


def test_verify_says_when_the_run_has_no_watermark_step(plain_run, monkeypatch):
    result, out = invoke(monkeypatch, "watermark", "verify", str(plain_run), "--key", "k", "--trigger-size", "30")
    assert result.exit_code == 1, out
    assert "has no waffle step (a run without a watermark?); checking 30 triggers of 12 tokens" in out
    assert "not verified" in out


def test_trace_refuses_no_clients_and_does_not_trace_a_model_without_keys(plain_run, monkeypatch):
    result, out = invoke(monkeypatch, "watermark", "trace", str(plain_run), "--key", "m", "--clients", "0")
    assert result.exit_code == 2 and "--clients 0: give the number of clients, 1 or more" in out
    result, out = invoke(monkeypatch, "watermark", "trace", str(plain_run), "--key", "m", "--clients", "3")
    assert result.exit_code == 1, out
    assert "Bonferroni-adjusted over 3 keys" in out and "not traced" in out and "(alpha 1e-06)" in out


def test_verify_and_trace_name_a_missing_folder(tmp_path, monkeypatch):
    for command in (["verify", "--key", "k"], ["trace", "--key", "m", "--clients", "2"]):
        result, out = invoke(monkeypatch, "watermark", command[0], str(tmp_path / "nowhere"), *command[1:])
        assert result.exit_code == 2 and "nowhere: not a run directory nor a .safetensors file" in out


def test_an_unfinished_run_points_to_its_last_checkpoint(tmp_path):
    from fedfm.ip.loading import resolve

    run = tmp_path / "run"
    for r in (0, 2, 1):
        (run / "checkpoints" / f"round-00000{r}").mkdir(parents=True)
        (run / "checkpoints" / f"round-00000{r}" / "state.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no final.safetensors in this directory \(an unfinished run: its last "
                                                r"checkpoint's global model is .*round-000002/state.safetensors; give "
                                                r"that file, with --config .*run/config.yaml\)"):
        resolve(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no final.safetensors in this directory$"):
        resolve(tmp_path / "empty")


def test_a_run_recorded_under_older_rules_still_loads_for_verification(tmp_path):
    """codecs.down with error_feedback is refused today; a run that recorded it still loads."""
    from safetensors.torch import save_file

    from fedfm.config import ConfigError, load_config
    from fedfm.ip.loading import load_suspect

    run = tmp_path / "run"
    run.mkdir()
    raw = tiny_config(tmp_path, **{"codecs.down": [{"topk": 0.5, "error_feedback": True}]})
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    save_file({}, str(run / "final.safetensors"))
    with pytest.raises(ConfigError, match=r"codecs.down\[0\]: error_feedback is for codecs.up only"):
        load_config(run / "config.yaml")
    exp, _, state = load_suspect(run)
    assert exp.codecs.down == [{"topk": 0.5, "error_feedback": True}] and len(state) == 10  # the tiny LoRA's template
    with pytest.raises(ConfigError, match="error_feedback is for codecs.up only"):  # a --config given is checked
        load_suspect(run, run / "config.yaml")
