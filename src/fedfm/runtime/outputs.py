"""What a run leaves behind: config.yaml, metrics.jsonl, summary.json, final.safetensors,
for a classifier labels.json (which class id is which label), and the tracking sinks'
files (``tracking:``, ``fedfm.tracking``)."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from fedfm.core.types import State
from fedfm.tracking import open_sinks


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. The last line may be cut short by a killed run and is
    then skipped; any earlier line that is not a round's JSON object means the file was
    damaged or edited, and is refused naming the line (a resume would otherwise rewrite
    the file without it, a report would silently leave the round out)."""
    rows: list[dict[str, Any]] = []
    path = Path(path)
    if not path.exists():
        return rows
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "round" in row:
            rows.append(row)
        elif i < len(lines) - 1:
            raise ValueError(f"{path} line {n} is not a round's JSON object ({line[:60]!r}); the file was damaged or edited: fix or remove that line")
    return rows


class RunWriter:
    """``resume_round``: keep the metrics rows up to that round (the last checkpointed
    one) and drop later or partial rows; otherwise start an empty metrics.jsonl."""

    def __init__(self, out: str | Path, exp, resume_round: int | None = None):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        from fedfm.personalize.init_from import recorded  # model.init_from absolute: the chain loads from anywhere

        atomic_write(self.dir / "config.yaml", yaml.safe_dump(recorded(exp.dump()), sort_keys=False).encode())
        self.metrics_path = self.dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_round is None:
            self.metrics_path.write_text("")
        else:
            self.rows = [r for r in read_metrics(self.metrics_path) if r["round"] <= resume_round]
            atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        self.sinks = open_sinks(exp, self.dir, resume_round)  # tracking: TensorBoard, MLflow
        for sink in self.sinks:
            sink.log_params(exp.dump())

    def log_round(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for sink in self.sinks:
            sink.log_round(row)

    def finish(self, state: State, summary: dict[str, Any]) -> None:
        tmp = self.dir / "final.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, self.dir / "final.safetensors")
        atomic_write(self.dir / "summary.json", json.dumps(summary, indent=2).encode())
        for sink in self.sinks:
            sink.close()


def write_labels(out: str | Path, mapping: dict[str, int], num_labels: int, column: str | None = None) -> Path:
    """``DIR/labels.json``: the label-to-id mapping the classifier head was trained with,
    so that final.safetensors can be read later (output ``i`` is the label mapped to ``i``)."""
    path = Path(out) / "labels.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"label_column": column, "num_labels": num_labels, "labels": mapping}
    atomic_write(path, json.dumps(body, indent=2, ensure_ascii=False).encode())
    return path


PRIVACY_KEYS = (".epsilon", ".epsilon_worst", ".delta", ".noise")


def privacy_spent(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"privacy": {...}}``: the privacy budget spent by the end of the run, as the DP steps
    reported it in metrics.jsonl (``dp_noise.epsilon``, ``dp_sgd.epsilon_worst``,
    ``*.delta``: the last value of each key); empty when no step reports one."""
    spent: dict[str, float] = {}
    for row in rows:
        spent.update({k: v for k, v in row.items() if k.endswith(PRIVACY_KEYS)})
    return {"privacy": spent} if spent else {}


def run_summary(rows: list[dict[str, Any]], exp, backend: str, wall_s: float, resumed_from: int | None,
                warnings: list[str], fingerprint: str) -> dict[str, Any]:
    """summary.json of a run, from its metrics.jsonl rows."""
    first, last = rows[0], rows[-1]
    evaluated = [r for r in rows if "loss" in r]
    last_eval = evaluated[-1] if evaluated else last
    return {
        "name": exp.name,
        "backend": backend,
        "rounds": exp.rounds,
        "final": {k: last_eval.get(k) for k in ("accuracy", "balanced_accuracy", "loss") if k in last_eval},
        "initial": {k: first.get(k) for k in ("accuracy", "balanced_accuracy", "loss") if k in first},
        "total_bytes_up": sum(r.get("bytes_up", 0) for r in rows),
        "total_bytes_down": sum(r.get("bytes_down", 0) for r in rows),
        "skipped_rounds": [r["round"] for r in rows if r.get("skipped")],
        "dropped": sum(len(r.get("dropped", [])) for r in rows),
        "failed": sum(len(r.get("failed", [])) for r in rows),
        "rejected": sum(len(r.get("rejected", [])) for r in rows),
        "resumed_from": resumed_from,
        **privacy_spent(rows),
        "warnings": warnings,
        "wall_s": wall_s,
        "peak_rss_mb": peak_rss_mb(),
        "fingerprint": fingerprint,
    }
