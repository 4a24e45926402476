"""Report and tracking under bad input: missing folders, unwritable sink places."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedfm.report import load_run
from fedfm.tracking import open_sinks


def test_report_names_a_missing_folder_and_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "f.csv").write_text("x\n")
    with pytest.raises(FileNotFoundError, match=r"f.csv: a file, not a run directory"):
        load_run(tmp_path / "f.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no metrics.jsonl \(is it a fedfm run directory\?\)"):
        load_run(tmp_path / "empty")


def _exp(tensorboard=None, mlflow=None):
    return SimpleNamespace(name="t", tracking=SimpleNamespace(tensorboard=tensorboard, mlflow=mlflow))


def test_an_unwritable_tensorboard_dir_names_the_field(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "tb"  # under a file: no folder can be made there
    with pytest.raises(ValueError, match=r"tracking.tensorboard.dir: cannot write TensorBoard events to .*file/tb \(Not a directory\)"):
        open_sinks(_exp(tensorboard=SimpleNamespace(dir=str(bad))), tmp_path / "out")


def test_an_unopenable_mlflow_store_names_the_field(tmp_path):
    pytest.importorskip("mlflow")
    (tmp_path / "file").write_text("x")
    uri = f"sqlite:///{tmp_path / 'file' / 'x.db'}"
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"tracking.mlflow.uri: cannot open the MLflow store sqlite:///"):
        open_sinks(_exp(mlflow=SimpleNamespace(uri=uri, experiment="e")), tmp_path / "out")
