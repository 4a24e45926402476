"""The run directory before, during and after a start: nothing of a previous run is lost.

``fedfm run CONFIG --out DIR`` on a directory that already holds files is refused unless
the user says what to do with them:

- ``--resume``: continue the run there from its last checkpoint (nothing is moved);
- ``--overwrite``: start again. The old files are moved into ``DIR/.replaced-<n>/``, not
  deleted, and stay there until the new run has written its first checkpoint
  (``drop_replaced``). A start that fails or is interrupted before that puts them back
  (``restore_replaced``), so the directory is left exactly as it was.

A fresh start in an empty or new directory that fails before its first checkpoint removes
what it wrote (and the directory, if it made it), so the same command can simply be run
again. ``parts.json`` records where each resumed part of a run began, so that
``merge_wall_time`` can give the summary the wall time of the whole run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfm.runtime.outputs import atomic_write, read_metrics

REPLACED = ".replaced-"
PARTS = "parts.json"
# Names that mark a directory as a fedfm run (only such a directory may be overwritten).
RUN_FILES = (
    "config.yaml", "metrics.jsonl", "summary.json", "final.safetensors", "labels.json", PARTS, "checkpoints", "clients",
)


class RunDirError(ValueError):
    """A run directory that this command may not use as asked."""


@dataclass
class RunDir:
    """What ``prepare_run_dir`` found and did."""

    path: Path
    mode: str  # "new" | "overwrite" | "resume"
    created: bool  # the directory did not exist before
    replaced: Path | None = None  # overwrite: where the old files wait
    resume_after: int | None = None  # resume: the last checkpointed round


def _entries(out: Path) -> list[Path]:
    return sorted(out.iterdir()) if out.is_dir() else []


def _replaced_dirs(out: Path) -> list[Path]:
    found = [p for p in _entries(out) if p.is_dir() and p.name.startswith(REPLACED) and p.name[len(REPLACED):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(REPLACED):]))


def checkpointed_rounds(out: Path) -> list[int]:
    from fedfm.runtime.checkpoint import Checkpointer

    return Checkpointer(out).rounds()


def last_round(out: str | Path) -> int | None:
    """The round of the last line of ``DIR/metrics.jsonl`` (None when it has none)."""
    rows = read_metrics(Path(out) / "metrics.jsonl")
    return rows[-1]["round"] if rows else None


def has_started(out: str | Path) -> bool:
    """Whether the run in ``out`` got as far as its first logged round or checkpoint."""
    return bool(checkpointed_rounds(Path(out))) or last_round(out) is not None


def _shown(entries: list[Path]) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


def prepare_run_dir(out: str | Path, resume: bool, overwrite: bool) -> RunDir:
    """Make ``out`` ready for a run, or refuse with a message naming it and both flags.

    Call before anything is built, so that a refusal costs nothing and changes nothing.
    """
    out = Path(out)
    if resume and overwrite:
        raise RunDirError("give at most one of --resume and --overwrite")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory")
    entries = _entries(out)
    if resume:
        rounds = checkpointed_rounds(out)
        if rounds:
            try:  # a damaged metrics.jsonl is refused before anything is written
                read_metrics(out / "metrics.jsonl")
            except ValueError as exc:
                raise RunDirError(f"--resume: {exc}") from None
            _record_part(out, rounds[-1])
            return RunDir(out, "resume", created=False, resume_after=rounds[-1])
        if entries:
            held = _replaced_dirs(out)
            note = f"; the files of the run it was replacing are in {held[-1]}" if held else ""
            raise RunDirError(
                f"--resume: {out} holds no checkpoint to continue from (files: {_shown(entries)}){note}; "
                f"pass --overwrite instead of --resume to start the run again there"
            )
    if not entries:
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        return RunDir(out, "new", created=created)
    if not overwrite:
        raise RunDirError(
            f"{out} already holds files ({_shown(entries)}): pass --resume to continue the run there, "
            f"or --overwrite to replace it (its files are kept until the new run's first checkpoint), "
            f"or choose another --out"
        )
    if not any((out / name).exists() for name in RUN_FILES) and not _replaced_dirs(out):
        raise RunDirError(
            f"--overwrite: {out} does not look like a fedfm run directory (no config.yaml, metrics.jsonl "
            f"or checkpoints/; it holds {_shown(entries)}); refusing to replace it: choose another --out"
        )
    held = _replaced_dirs(out)
    target = out / f"{REPLACED}{int(held[-1].name[len(REPLACED):]) + 1 if held else 1}"
    target.mkdir()
    for entry in entries:
        entry.rename(target / entry.name)
    return RunDir(out, "overwrite", created=False, replaced=target)


def drop_replaced(out: str | Path) -> None:
    """Delete the files of the run that ``--overwrite`` replaced: call once the new run has
    written its first checkpoint (after round 0). Does nothing when there are none."""
    for held in _replaced_dirs(Path(out)):
        shutil.rmtree(held, ignore_errors=True)


def restore_replaced(out: str | Path) -> bool:
    """Undo an ``--overwrite`` start: remove what the new run wrote and move the old run's
    files back. True when there was something to restore."""
    out = Path(out)
    held = _replaced_dirs(out)
    if not held:
        return False
    newest = held[-1]
    for entry in _entries(out):
        if entry != newest:
            _remove(entry)
    for entry in sorted(newest.iterdir()):
        entry.rename(out / entry.name)
    newest.rmdir()
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def settle_failed_start(rd: RunDir) -> str | None:
    """After a failure or an interruption: put the directory back as it was when the new
    run had not started yet; once it has, keep it (and drop the replaced run). Returns a
    line saying what was done, or None."""
    out = rd.path
    if rd.mode == "resume":
        return None
    if has_started(out):
        drop_replaced(out)
        return None
    if rd.mode == "overwrite":
        restore_replaced(out)
        return f"{out} is as it was before this run"
    for entry in _entries(out):
        _remove(entry)
    if rd.created:
        out.rmdir()
    return f"{out} is as it was before this run"


# -- wall time across the parts of a resumed run ----------------------------------------


def _record_part(out: Path, resume_after: int) -> None:
    parts = _read_parts(out)
    parts.append({"resumed_after": resume_after, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    atomic_write(out / PARTS, json.dumps(parts, indent=1).encode())


def _read_parts(out: Path) -> list[dict[str, Any]]:
    try:
        parts = json.loads((out / PARTS).read_text())
    except (OSError, ValueError):
        return []
    return [p for p in parts if isinstance(p, dict) and isinstance(p.get("resumed_after"), int)]


def merge_wall_time(out: str | Path, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with the wall time of the whole run and one entry per part.

    ``summary["wall_s"]`` on entry is this process's time; on return it is the total over
    all parts, and ``summary["parts"]`` lists each part's rounds and wall time. An earlier
    part's time is the sum of its rounds' ``wall_s`` in metrics.jsonl (what the round loop
    measures; a round cut short by the interruption is not counted). Call it from the
    round loop after the last round, before summary.json is written. A summary that
    already has ``parts`` is returned as it is, so a second call changes nothing.
    """
    if "parts" in summary:
        return summary
    rows = read_metrics(Path(out) / "metrics.jsonl")
    resumed = summary.get("resumed_from")
    now = float(summary.get("wall_s") or 0.0)
    last = rows[-1]["round"] if rows else summary.get("rounds", 0)
    if resumed is None:
        summary["parts"] = [{"rounds": [0, last], "wall_s": now}]
        return summary
    cuts = sorted({p["resumed_after"] for p in _read_parts(Path(out)) if p["resumed_after"] < resumed} | {resumed})
    parts, first = [], 0
    for cut in cuts:
        spent = sum(float(r.get("wall_s") or 0.0) for r in rows if first <= r["round"] <= cut)
        parts.append({"rounds": [first, cut], "wall_s": spent})
        first = cut + 1
    parts.append({"rounds": [first, last], "wall_s": now, "resumed_after": resumed})
    for part, cut in zip(parts[1:-1], cuts[:-1]):
        part["resumed_after"] = cut
    summary["parts"] = parts
    summary["wall_s"] = sum(p["wall_s"] for p in parts)
    return summary


def complete_summary(out: str | Path, summary: dict[str, Any]) -> dict[str, Any]:
    """``merge_wall_time`` applied to DIR/summary.json (rewritten) when the loop did not."""
    if "parts" in summary:
        return summary
    summary = merge_wall_time(out, dict(summary))
    path = Path(out) / "summary.json"
    if path.is_file():
        atomic_write(path, json.dumps(summary, indent=2).encode())
    return summary
