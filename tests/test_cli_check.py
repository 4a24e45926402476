"""``fedfm check``: a config checked as ``fedfm run`` checks it before training (config,
data against the model, components), with nothing loaded beyond config.json and nothing
written."""

from __future__ import annotations

import yaml

from conftest import invoke, tiny_config


def write(tmp_path, raw, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_check_passes_a_good_config_and_writes_nothing(tmp_path, monkeypatch):
    cfg = write(tmp_path, tiny_config(tmp_path))
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result, out = invoke(monkeypatch, "check", cfg)
    assert result.exit_code == 0, out
    assert "ok: tiny, 2 rounds, 2 clients, learner local, aggregator fedavg" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/ folder, no labels.json


def test_check_names_what_run_would_refuse(tmp_path, monkeypatch):
    cfg = write(tmp_path, tiny_config(tmp_path, **{"data.max_length": 4096}))
    result, out = invoke(monkeypatch, "check", cfg)
    assert result.exit_code == 1 and "data.max_length=4096 exceeds the model's max_position_embeddings=" in out
    result, out = invoke(monkeypatch, "check", cfg, "-o", "data.label_column=nope")
    assert result.exit_code == 1 and "data.label_column: column 'nope' not in" in out
    result, out = invoke(monkeypatch, "check", cfg, "-o", "train.lrr=1")
    assert result.exit_code == 2 and "did you mean 'lr'?" in out


def test_check_goes_through_every_stage_and_names_the_failing_one(tmp_path, monkeypatch):
    good = tiny_config(tmp_path, peft={"method": "full"})  # a later stage starts from its full State
    bad = tiny_config(tmp_path, **{"data.max_length": 4096})
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "first", "config": good}, {"name": "second", "config": bad}]}))
    monkeypatch.chdir(tmp_path)
    result, out = invoke(monkeypatch, "check", str(path))
    assert result.exit_code == 1
    assert "stage 'first': ok: " in out and "stage 'second': data.max_length=4096 exceeds" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "chain").exists()
