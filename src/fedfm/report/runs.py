"""Read what a run directory holds: config.yaml, metrics.jsonl, summary.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedfm.runtime.outputs import read_metrics


@dataclass
class Run:
    dir: Path
    label: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(rounds, values) of the rows where ``key`` has a value."""
        pts = [(r["round"], float(r[key])) for r in self.rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def cumulative_bytes(self) -> list[int]:
        total, out = 0, []
        for r in self.rows:
            total += int(r.get("bytes_up", 0)) + int(r.get("bytes_down", 0))
            out.append(total)
        return out

    @property
    def num_clients(self) -> int:
        n = (self.config.get("federation") or {}).get("clients")
        seen = [c for r in self.rows for c in r.get("sampled", r.get("clients", []))]
        return int(n) if n else (max(seen) + 1 if seen else 0)


def load_run(path: str | Path) -> Run:
    d = Path(path)
    metrics = d / "metrics.jsonl"
    if not d.exists():
        raise FileNotFoundError(f"{d}: no such folder")
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: a file, not a run directory")
    if not metrics.is_file():
        raise FileNotFoundError(f"{d}: no metrics.jsonl (is it a fedfm run directory?)")
    rows = read_metrics(metrics)
    if not rows:
        raise ValueError(f"{metrics}: no complete round")
    config = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    label = str(summary.get("name") or config.get("name") or d.name)
    return Run(dir=d, label=label, config=config or {}, rows=rows, summary=summary)


def unique_labels(runs: list[Run]) -> None:
    """Two runs with the same name are told apart by their directory."""
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.label} ({r.dir})"
