"""Reports: PNG plots and a self-contained report.html from hand-written run directories."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fedfm.cli import app
from fedfm.report import build_report, load_run
from fedfm.report.plots import participation_grid

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(d, name: str, acc: list[float]) -> None:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"name": name, "federation": {"clients": 3}}))
    rows = [{"round": 0, "accuracy": acc[0], "loss": 0.7, "bytes_up": 0, "bytes_down": 0, "clients": []}]
    for r, a in enumerate(acc[1:], start=1):
        rows.append({
            "round": r, "accuracy": a, "loss": 0.7 - 0.1 * r, "train_loss": 0.6 - 0.1 * r,
            "bytes_up": 1000, "bytes_down": 2000, "clients": [0], "sampled": [0, 1, 2],
            "dropped": [{"cid": 1, "reason": "dropout"}], "failed": [],
            "rejected": [{"cid": 2, "reason": "nan in 'w'"}], "skipped": None,
        })
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 9, "acc')
    (d / "summary.json").write_text(json.dumps({"name": name, "wall_s": 12.5, "peak_rss_mb": 321.0}))


def test_participation_grid_by_hand(tmp_path):
    fake_run(tmp_path / "a", "a", [0.5, 0.6, 0.7])
    run = load_run(tmp_path / "a")
    assert [r["round"] for r in run.rows] == [0, 1, 2]  # the cut-off last line is skipped
    assert run.cumulative_bytes() == [0, 3000, 6000]
    grid = participation_grid(run)  # (clients, rounds): 1 aggregated, 2 dropped, 4 rejected
    assert grid.tolist() == [[1, 1], [2, 2], [4, 4]]


def test_report_overlays_runs_into_pngs_and_html(tmp_path):
    fake_run(tmp_path / "a", "fedavg", [0.5, 0.6, 0.7])
    fake_run(tmp_path / "b", "fedprox", [0.5, 0.65, 0.75])
    page = build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    for name in ("accuracy", "loss", "bytes_accuracy", "participation"):
        png = tmp_path / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 1000
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "fedavg" in html and "fedprox" in html
    assert "<td>0.7000</td>" in html and "<td>0.7500</td>" in html  # final accuracies
    assert "<td>0.0020</td><td>0.0040</td>" in html  # MB up, down: 2 rounds x 1000 B, x 2000 B
    assert "federation:" in html and "clients: 3" in html  # the configs


def test_report_cli(tmp_path):
    fake_run(tmp_path / "a", "a", [0.5, 0.6])
    result = CliRunner().invoke(app, ["report", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "report" / "report.html").exists()
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert bad.exit_code == 1 and "missing: no such folder" in bad.output


def test_report_replaces_only_its_own_files(tmp_path):
    fake_run(tmp_path / "a", "a", [0.5, 0.6])
    page = build_report([tmp_path / "a"])  # DIR/report
    mine = tmp_path / "a" / "report" / "notes.txt"
    mine.write_text("mine")
    assert build_report([tmp_path / "a"]) == page and mine.read_text() == "mine"  # an earlier report: replaced
    user = tmp_path / "figures"
    user.mkdir()
    (user / "loss.png").write_bytes(b"the user's own plot")
    with pytest.raises(ValueError, match=r"holds loss.png, which this report would overwrite and no fedfm report wrote"):
        build_report([tmp_path / "a"], user)
    assert (user / "loss.png").read_bytes() == b"the user's own plot" and not (user / "report.html").exists()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "a"), "--out", str(tmp_path / "a" / "config.yaml")],
                                env={"COLUMNS": "1000"})
    assert result.exit_code == 1 and "config.yaml: a file, not a folder" in result.output
