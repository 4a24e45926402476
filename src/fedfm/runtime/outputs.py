"""What a run leaves behind: config.yaml, metrics.jsonl, summary.json, final.safetensors."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from fedfm.core.types import State


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunWriter:
    def __init__(self, out: str | Path, exp):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "config.yaml", yaml.safe_dump(exp.dump(), sort_keys=False).encode())
        self.metrics_path = self.dir / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.rows: list[dict[str, Any]] = []

    def log_round(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self, state: State, summary: dict[str, Any]) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(self.dir / "final.safetensors"))
        atomic_write(self.dir / "summary.json", json.dumps(summary, indent=2).encode())
