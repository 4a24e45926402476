"""A user's run directory: nothing of a previous run is lost (issue 21, "Data loss").

Every test hashes the old run's files before and after: a refused command, a failed
start and an interrupted start leave them byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import invoke, tiny_config
from fedfm.runtime.rundir import (
    RunDirError,
    drop_replaced,
    merge_wall_time,
    prepare_run_dir,
    restore_replaced,
)


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_config(tmp_path: Path, **over) -> Path:
    raw = tiny_config(tmp_path, **{"rounds": 2, "train.steps": 1, "train.epochs": 1, **over})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(config, run directory) of one finished 2-round run, made once and copied per test."""
    root = tmp_path_factory.mktemp("finished")
    cfg = write_config(root)
    mp = pytest.MonkeyPatch()
    try:
        result, text = invoke(mp, "run", str(cfg), "--out", str(root / "run"))
    finally:
        mp.undo()
    assert result.exit_code == 0, text
    return cfg, root / "run"


@pytest.fixture
def old_run(finished, tmp_path):
    cfg, run = finished
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return cfg, target


def test_a_finished_run_is_refused_and_untouched(old_run, monkeypatch):
    cfg, out = old_run
    before = hashes(out)
    result, text = invoke(monkeypatch, "run", str(cfg), "--out", str(out))
    assert result.exit_code == 2
    assert f"{out} already holds files" in text
    assert "pass --resume to continue the run there, or --overwrite to replace it" in text
    assert hashes(out) == before


def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_old_run(old_run, monkeypatch):
    from fedfm.runtime.workbench import Workbench

    cfg, out = old_run
    before = hashes(out)

    def broken(self, state):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(Workbench, "evaluate", broken)  # after config.yaml and metrics.jsonl are written
    result, text = invoke(monkeypatch, "run", str(cfg), "--out", str(out), "--overwrite")
    assert result.exit_code == 1, text
    assert "evaluation failed" in text and f"{out} is as it was before this run" in text
    assert hashes(out) == before
    assert not list(out.glob(".replaced-*"))


def test_ctrl_c_during_an_overwrite_start_restores_the_old_run(old_run, monkeypatch):
    from fedfm.runtime.workbench import Workbench

    cfg, out = old_run
    before = hashes(out)

    def interrupted(self, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(Workbench, "evaluate", interrupted)
    result, text = invoke(monkeypatch, "run", str(cfg), "--out", str(out), "--overwrite")
    assert result.exit_code == 130, text
    assert "interrupted before the first round was saved" in text
    assert hashes(out) == before


def test_overwrite_replaces_the_run_and_drops_the_old_files(old_run, monkeypatch, tmp_path):
    _, out = old_run
    cfg = write_config(tmp_path, seed=5, rounds=1)
    result, text = invoke(monkeypatch, "run", str(cfg), "--out", str(out), "--overwrite")
    assert result.exit_code == 0, text
    assert not list(out.glob(".replaced-*"))
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_a_failed_start_in_a_new_directory_leaves_nothing(tmp_path, monkeypatch):
    from fedfm.runtime.workbench import Workbench

    cfg = write_config(tmp_path)
    monkeypatch.setattr(Workbench, "evaluate", lambda self, state: (_ for _ in ()).throw(RuntimeError("boom")))
    result, text = invoke(monkeypatch, "run", str(cfg), "--out", str(tmp_path / "fresh"))
    assert result.exit_code == 1 and "boom" in text
    assert not (tmp_path / "fresh").exists()
    # ... so the same command simply runs again
    monkeypatch.undo()
    result, text = invoke(monkeypatch, "run", str(cfg), "--out", str(tmp_path / "fresh"))
    assert result.exit_code == 0, text


def test_ctrl_c_says_how_to_continue_and_resume_reports_every_part(tmp_path, monkeypatch):
    from fedfm.runtime.progress import RunProgress

    cfg = write_config(tmp_path)
    out = tmp_path / "run"
    original = RunProgress.end_round

    def stop_after_round_1(self, rnd, row):
        original(self, rnd, row)
        if rnd == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunProgress, "end_round", stop_after_round_1)
    result, text = invoke(monkeypatch, "run", str(cfg), "-o", "train.lr=0.02", "--out", str(out))
    assert result.exit_code == 130, text
    assert f"interrupted after round 1; continue with: fedfm run {cfg} -o train.lr=0.02 --out {out} --resume" in text
    monkeypatch.setattr(RunProgress, "end_round", original)
    result, text = invoke(monkeypatch, "run", str(cfg), "-o", "train.lr=0.02", "--out", str(out), "--resume")
    assert result.exit_code == 0, text
    assert f"resuming {out} after round 1" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 1
    assert [p["rounds"] for p in summary["parts"]] == [[0, 1], [2, 2]]
    assert summary["parts"][1]["resumed_after"] == 1
    assert summary["wall_s"] == pytest.approx(sum(p["wall_s"] for p in summary["parts"]))
    assert "over 2 parts" in text


def test_resume_flag_rules(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 0}\n')
    before = hashes(out)
    with pytest.raises(RunDirError, match="at most one of --resume and --overwrite"):
        prepare_run_dir(out, resume=True, overwrite=True)
    with pytest.raises(RunDirError, match="holds no checkpoint to continue from"):
        prepare_run_dir(out, resume=True, overwrite=False)
    assert hashes(out) == before


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="does not look like a fedfm run directory"):
        prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_replaced_files_move_back_byte_for_byte_or_are_dropped(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "round-000002").mkdir(parents=True)
    (out / "checkpoints" / "round-000002" / "state.safetensors").write_bytes(b"\x00\x01state")
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "summary.json").write_text("{}")
    before = hashes(out)
    rd = prepare_run_dir(out, resume=False, overwrite=True)
    assert rd.replaced == out / ".replaced-1" and sorted(p.name for p in out.iterdir()) == [".replaced-1"]
    (out / "config.yaml").write_text("seed: 1\n")  # the new run's first file
    assert restore_replaced(out)
    assert hashes(out) == before and not (out / ".replaced-1").exists()
    prepare_run_dir(out, resume=False, overwrite=True)
    drop_replaced(out)
    assert list(out.iterdir()) == []


def test_merge_wall_time_over_three_parts(tmp_path):
    rows = [{"round": r, "wall_s": w} for r, w in enumerate([1.0, 10.0, 20.0, 30.0, 40.0])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "parts.json").write_text(json.dumps([{"resumed_after": 1}, {"resumed_after": 3}]))
    summary = merge_wall_time(tmp_path, {"rounds": 4, "wall_s": 41.0, "resumed_from": 3})
    assert summary["parts"] == [
        {"rounds": [0, 1], "wall_s": 11.0},
        {"rounds": [2, 3], "wall_s": 50.0, "resumed_after": 1},
        {"rounds": [4, 4], "wall_s": 41.0, "resumed_after": 3},
    ]
    assert summary["wall_s"] == 102.0
    assert merge_wall_time(tmp_path, summary) == summary  # a second call changes nothing


def test_a_damaged_metrics_line_is_named_and_nothing_is_rewritten(old_run, monkeypatch):
    from fedfm.runtime.outputs import read_metrics

    cfg, out = old_run
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    assert len(lines) == 3  # rounds 0, 1, 2
    metrics.write_text("\n".join(lines + ['{"round": 3, "accu']) + "\n")  # a line cut short by a kill
    assert [r["round"] for r in read_metrics(metrics)] == [0, 1, 2]
    metrics.write_text("\n".join([lines[0], lines[1][:-5], lines[2]]) + "\n")  # an edit broke round 1
    before = hashes(out)
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a round's JSON object"):
        read_metrics(metrics)
    for args in (["run", str(cfg), "--out", str(out), "--resume"], ["report", str(out)]):
        result, text = invoke(monkeypatch, *args)
        assert result.exit_code in (1, 2), (text, result.exception)
        assert f"{metrics} line 2 is not a round's JSON object" in text and "fix or remove that line" in text, text
    assert hashes(out) == before
