"""Labels checked against ``model.num_labels`` before the model loads (issue 21).

Too many labels end in an error that lists them and leaves nothing on disk; a missing
``num_labels`` is inferred; a training or test set with one class is warned about; the
label-to-id mapping is saved in the run as labels.json.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import invoke, tiny_config
from fedfm.config import from_dict
from fedfm.data import build_federation, load_source, resolve_labels


def topic_csv(path, n_labels: int, rows: int = 200):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "text": [f"text {i}" for i in range(rows)],
        "label": [f"topic{int(k):02d}" for k in rng.integers(0, n_labels, size=rows)],
        "group": [f"g{i % 10}" for i in range(rows)],
    })
    frame.to_csv(path, index=False)
    return path


def write(tmp_path, raw) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    return str(path)


def test_num_labels_is_optional_and_inferred(tmp_path):
    raw = tiny_config(tmp_path, **{"data.path": str(topic_csv(tmp_path / "t.csv", 3))})
    del raw["model"]["num_labels"]
    exp = from_dict(raw)
    assert exp.model.num_labels is None
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    labels = resolve_labels(exp, fed)
    assert exp.model.num_labels == 3 == labels.num_labels
    assert labels.mapping == {"topic00": 0, "topic01": 1, "topic02": 2}


def test_binary_configs_with_num_labels_2_still_pass(tmp_path):
    exp = from_dict(tiny_config(tmp_path))
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    labels = resolve_labels(exp, fed)
    assert exp.model.num_labels == 2 and labels.mapping == {"0": 0, "1": 1} and labels.warnings == []


def test_too_many_labels_are_named_before_the_model_loads_and_nothing_is_written(tmp_path, monkeypatch, model_builds):
    raw = tiny_config(tmp_path, **{"data.path": str(topic_csv(tmp_path / "t.csv", 50, rows=400))})
    out = tmp_path / "run"
    result, text = invoke(monkeypatch, "run", write(tmp_path, raw), "--out", str(out))
    assert result.exit_code == 1, text
    assert f"model.num_labels=2, but data.path {tmp_path / 't.csv'} has 50 labels: topic00, topic01" in text
    assert "... (50 in all)" in text and "set model.num_labels: 50 or leave it out" in text
    assert model_builds["models"] == 0
    assert not out.exists()


def test_integer_labels_beyond_num_labels(tmp_path):
    csv = tmp_path / "ints.csv"
    pd.DataFrame({"text": ["a"] * 60, "label": [0, 1, 37] * 20, "group": [f"g{i % 6}" for i in range(60)]}).to_csv(csv, index=False)
    exp = from_dict(tiny_config(tmp_path, **{"data.path": str(csv), "federation.test_examples": 10}))
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    with pytest.raises(ValueError, match=r"has 3 labels: 0, 1, 37 \(class ids up to 37\); set model.num_labels: 38"):
        resolve_labels(exp, fed)


def test_a_single_class_training_and_test_set_are_warned(tmp_path):
    csv = tmp_path / "one.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(120)], "label": ["ham"] * 120,
                  "group": [f"g{i % 12}" for i in range(120)]}).to_csv(csv, index=False)
    raw = tiny_config(tmp_path, **{"data.path": str(csv)})
    del raw["model"]["num_labels"]
    exp = from_dict(raw)
    labels = resolve_labels(exp, build_federation(load_source(exp.data), exp.federation, exp.seed))
    text = " | ".join(labels.warnings)
    assert "the training set holds one class only (label ham): nothing to learn" in text
    assert "the test set holds one class only (label ham)" in text
    assert "model.num_labels is 1" in text


def test_the_run_saves_the_label_mapping(tmp_path, monkeypatch):
    raw = tiny_config(tmp_path, **{"data.path": str(topic_csv(tmp_path / "t.csv", 3)), "rounds": 1,
                                   "train.steps": 1, "train.epochs": 1})
    del raw["model"]["num_labels"]
    out = tmp_path / "run"
    result, text = invoke(monkeypatch, "run", write(tmp_path, raw), "--out", str(out))
    assert result.exit_code == 0, text
    assert "labels: topic00=0, topic01=1, topic02=2 (model.num_labels 3)" in text
    saved = json.loads((out / "labels.json").read_text())
    assert saved == {"label_column": "label", "num_labels": 3, "labels": {"topic00": 0, "topic01": 1, "topic02": 2}}
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["num_labels"] == 3


def test_a_causal_lm_has_no_labels_to_check(tmp_path):
    from tiny_llm import tiny_llm_config

    exp = from_dict(tiny_llm_config(tmp_path))
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    assert resolve_labels(exp, fed) is None
