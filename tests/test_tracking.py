"""Tracking sinks round-trip through the real libraries: a 2-round tiny run with both
sinks, then TensorBoard's EventAccumulator and MLflow's client read back every numeric
metrics.jsonl field and the config."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.runtime import LocalRuntime
from fedfm.tracking.sinks import numeric_fields, param_values


def test_numeric_fields_and_params_flatten():
    row = {"round": 3, "loss": 0.5, "ok": True, "clients": [0, 1], "skipped": None, "name": "x",
           "codec_bytes": {"up": {"cast": 10}, "down": {}}, "bad": float("nan")}
    # round is the step; booleans, lists, None, strings and NaN are left out
    assert numeric_fields(row) == {"loss": 0.5, "codec_bytes.up.cast": 10.0}
    assert param_values({"train": {"lr": 0.01, "steps": None}, "codecs": {"up": [{"name": "cast"}]}}) == {
        "train.lr": 0.01, "train.steps": "null", "codecs.up": '[{"name": "cast"}]'}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    raw = tiny_config(tmp, **{"tracking.tensorboard": {}, "tracking.mlflow": {"experiment": "tiny-exp"},
                              "federation.examples_per_client": 24, "train.epochs": 1, "server.checkpoint": False})
    exp = from_dict(raw)
    LocalRuntime(exp, tmp / "run").run()
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return tmp / "run", rows, exp


def test_tensorboard_event_file_holds_every_numeric_field(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows, _ = tracked_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for row in rows:
        for key, value in numeric_fields(row).items():
            assert key in tags
            events = {e.step: e.value for e in acc.Scalars(key)}
            assert events[row["round"]] == pytest.approx(value, rel=1e-6)
    assert [e.step for e in acc.Scalars("loss")] == [0, 1, 2]
    assert "accuracy" in tags and "bytes_up" in tags
    assert "config/text_summary" in acc.Tags()["tensors"]
    # the config as hparams: the experiment and session summaries of TensorBoard's HPARAMS tab
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))


def test_mlflow_store_holds_metrics_and_config(tracked_run):
    from mlflow.tracking import MlflowClient

    out, rows, exp = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("tiny-exp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == (out / "mlflow_run_id").read_text()
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01"
    assert run.data.params["peft.method"] == "lora" and run.data.params["seed"] == "0"
    assert run.data.params["peft.target_modules"] == '["query", "value"]'
    for key in numeric_fields(rows[1]):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for row in rows:
            if key in numeric_fields(row):
                assert history[row["round"]] == pytest.approx(numeric_fields(row)[key], rel=1e-6)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy")) == [0, 1, 2]


def test_tracking_section_is_strict(tmp_path):
    with pytest.raises(ConfigError, match="tracking.tensorboard.logdir"):
        from_dict(tiny_config(tmp_path, **{"tracking.tensorboard": {"logdir": "x"}}))
