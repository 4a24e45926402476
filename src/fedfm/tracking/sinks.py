"""Experiment tracking sinks beside metrics.jsonl: the ``tracking:`` config section.

A sink receives the resolved config once (``log_params``: flattened to dotted keys, e.g.
``train.lr``), every numeric field of every metrics row (``log_round``: nested dicts
flattened the same way, e.g. ``codec_bytes.up.cast``; lists, strings, booleans, None and
non-finite values are left out; the step is the row's ``round``) and ``close`` at the end
of the run. ``RunWriter`` (``runtime/outputs.py``) calls them, so metrics.jsonl stays the
record and the sinks mirror it.

The writing is the libraries' own (TensorBoard's event files through its SummaryWriter,
MLflow's tracking client); this module only maps fedfm's rows and config onto them.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    def log_params(self, config: dict[str, Any]) -> None: ...

    def log_round(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys; other values unchanged."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def numeric_fields(row: dict[str, Any]) -> dict[str, float]:
    """The finite int/float fields of a metrics row (flattened), ``round`` excluded."""
    out = {}
    for key, value in flatten(row).items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def param_values(config: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """The flattened config; lists and None as JSON text (parameters are scalars)."""
    return {
        k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
        for k, v in flatten(config).items()
    }


def missing(package: str, extra: str = "tracking") -> ImportError:
    return ImportError(f"tracking: the '{package}' package is not installed: pip install 'fedfm[{extra}]' (or pip install {package})")


class TensorBoardSink:
    """Scalars under their metrics.jsonl names; the config as TensorBoard hparams (the
    HPARAMS tab) and as YAML text (the TEXT tab). On resume, ``purge_step`` drops the
    events of rounds after the resumed one."""

    def __init__(self, log_dir: str | Path, resume_round: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing("tensorboard") from None
        self.dir = Path(log_dir)
        purge = None if resume_round is None else resume_round + 1
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge)

    def log_params(self, config: dict[str, Any]) -> None:
        import yaml
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(param_values(config), {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")
        self.writer.flush()

    def log_round(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for key, value in numeric_fields(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_MLFLOW_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")
MLFLOW_RUN_FILE = "mlflow_run_id"


class MlflowSink:
    """One MLflow run per fedfm run, in ``experiment``; the run id is kept in
    ``<run dir>/mlflow_run_id`` so that ``--resume`` continues the same MLflow run.
    Key characters MLflow refuses are replaced with ``_``."""

    def __init__(self, uri: str, experiment: str, run_name: str, out: Path, resume_round: int | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing("mlflow") from None
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        id_file = Path(out) / MLFLOW_RUN_FILE
        if resume_round is not None and id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            self.resumed = True
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            id_file.write_text(self.run_id)
            self.resumed = False

    @staticmethod
    def key(name: str) -> str:
        return _MLFLOW_KEY.sub("_", name)

    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self.resumed:  # parameters are immutable in MLflow; the resumed run has them
            return
        params = [Param(self.key(k), str(v)[:6000]) for k, v in param_values(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_round(self, row: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        step, now = int(row["round"]), int(time.time() * 1000)
        metrics = [Metric(self.key(k), v, now, step) for k, v in numeric_fields(row).items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_sinks(exp, out: str | Path, resume_round: int | None = None) -> list[Sink]:
    """The sinks ``exp.tracking`` asks for (none by default), writing next to ``out``."""
    out = Path(out)
    cfg = exp.tracking
    sinks: list[Sink] = []
    if cfg.tensorboard is not None:
        log_dir = Path(cfg.tensorboard.dir) if cfg.tensorboard.dir else out / "tensorboard"
        field = "tracking.tensorboard.dir" if cfg.tensorboard.dir else "tracking.tensorboard"
        try:
            if resume_round is None and not cfg.tensorboard.dir:  # a replaced run's events in the default folder
                for old in log_dir.glob("events.out.tfevents.*"):
                    old.unlink()
            sinks.append(TensorBoardSink(log_dir, resume_round))
        except OSError as exc:
            _close(sinks)
            raise ValueError(f"{field}: cannot write TensorBoard events to {log_dir} ({exc.strerror or exc})") from None
    if cfg.mlflow is not None:
        uri = cfg.mlflow.uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        field = "tracking.mlflow.uri" if cfg.mlflow.uri else "tracking.mlflow"
        try:
            sinks.append(MlflowSink(uri, cfg.mlflow.experiment or exp.name, out.name, out, resume_round))
        except ImportError:
            _close(sinks)
            raise
        except Exception as exc:  # MLflow raises its own exception types, and OSError from the store
            _close(sinks)
            raise ValueError(f"{field}: cannot open the MLflow store {uri} ({type(exc).__name__}: {exc})") from None
    return sinks


def _close(sinks: list[Sink]) -> None:
    """Close the sinks already opened when a later one fails."""
    for sink in sinks:
        sink.close()


def place_problem(path: str | Path) -> str | None:
    """Why a folder (or a file's folder) could not be created and written, read without
    writing anything (``fedfm check``), or None: an existing part of the path that is a
    file, or a nearest existing folder that this user cannot write."""
    p = Path(path).expanduser().absolute()
    for part in [p, *p.parents]:
        if part.exists():
            if not part.is_dir():
                return f"{part} is a file, not a folder"
            if not os.access(part, os.W_OK | os.X_OK):
                return f"{part} is not writable"
            return None
    return None


def tracking_problems(exp) -> list[str]:
    """The tracking places of ``exp`` that a run could not write (``place_problem``); the
    default places are in the run folder, which the run checks itself."""
    cfg, problems = exp.tracking, []
    if cfg.tensorboard is not None and cfg.tensorboard.dir:
        why = place_problem(cfg.tensorboard.dir)
        if why:
            problems.append(f"tracking.tensorboard.dir: cannot write TensorBoard events to {cfg.tensorboard.dir} ({why})")
    uri = (cfg.mlflow.uri if cfg.mlflow is not None else None) or ""
    if uri.startswith("sqlite:///"):
        target = Path(uri[len("sqlite:///"):]).parent  # the database file's folder
    elif uri.startswith("file://"):
        target = Path(uri[len("file://"):])
    else:
        target = None  # a server (http...) or the default store in the run folder
    why = place_problem(target) if target is not None else None
    if why:
        problems.append(f"tracking.mlflow.uri: cannot open the MLflow store {uri} ({why})")
    return problems
