"""One client's side of a Flower run: its data, the base model, the codec chains.

A ``ClientEnv`` (runtime/client.py) is what a ClientApp process needs to answer messages. It is
built once per (experiment, client, data location) and kept in a module-level cache, so a
ClientApp process that Flower keeps alive across rounds (Ray actors in simulation) loads
the foundation model once per run, not once per round.

Where the client's data comes from:

- node config ``data-path`` (deployment): the data owner's own table with columns ``text``
  and ``label`` (integer class ids), e.g. written by ``fedfm flower export-partitions``;
  every row is this client's.
- otherwise (simulation): the partition ``cid`` of the experiment's own data source, built
  exactly as the local backend builds it (same seed, same partitioner).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fedfm.config import DataConfig
from fedfm.core.types import ClientSpec
from fedfm.data import Federation, load_source
from fedfm.runtime.algorithm import build_algorithm
from fedfm.runtime.client import ClientEnv
from fedfm.runtime.store import ClientStore
from fedfm.runtime.workbench import Workbench

_SESSIONS: dict[tuple[str, str], ClientEnv] = {}


def check_cid(exp, cid: int) -> int:
    n = exp.federation.clients
    if not 0 <= int(cid) < n:
        raise ValueError(f"client id {cid} is outside 0..{n - 1} (federation.clients is {n})")
    return int(cid)


def owner_file_problem(exp) -> str | None:
    """Why a data owner's own file (columns ``text`` and ``label``) cannot feed ``exp``, or None:
    only tasks that learn class labels read such a file."""
    from fedfm.data.labels import LABEL_TASKS

    if exp.model.task in LABEL_TASKS:
        return None
    return (f"model.task {exp.model.task}: a SuperNode's own data file (node config data-path; columns text and label) "
            f"serves {' and '.join(LABEL_TASKS)} only; start the SuperNodes without data-path, so that each reads "
            "its partition (cid) of the experiment's data source")


def owner_federation(exp, cid: int, data_path: str) -> Federation:
    """A federation in which client ``cid`` owns every row of its own data file."""
    problem = owner_file_problem(exp)
    if problem is not None:
        raise ValueError(f"client {cid}: {problem}")
    cfg = DataConfig(source="file", path=data_path, max_length=exp.data.max_length, label_column="label")
    try:
        frame = load_source(cfg)
    except (OSError, ValueError, KeyError) as exc:  # the node's own file: name the node config key, not data.path
        what = str(exc).replace("data.path: ", "").replace("data.label_column", "column")
        kind = FileNotFoundError if isinstance(exc, FileNotFoundError) else ValueError
        raise kind(f"client {cid}: node config data-path {data_path}: {what}") from None
    if len(frame) == 0:
        raise ValueError(f"client {cid}: node config data-path {data_path}: the file has no rows")
    own = list(range(len(frame)))
    clients = [ClientSpec(cid=i, indices=own if i == cid else []) for i in range(exp.federation.clients)]
    return Federation(frame=frame, clients=clients, test_indices=np.array([], dtype=int))


def open_session(exp, key: str, cid: int, data_path: str | None, store_dir: str | Path, keep: bool = True) -> ClientEnv:
    """The cached session for (config hash, data location), built on first use.

    Without ``data_path`` the session holds every partition of the experiment's source
    (one Ray actor serves many virtual clients with one model, as the local backend does).
    """
    cid = check_cid(exp, cid)
    cache_key = (key, str(data_path or ""))
    if keep and cache_key in _SESSIONS:
        return _SESSIONS[cache_key]
    if exp.runtime.threads:
        torch.set_num_threads(exp.runtime.threads)
    federation = owner_federation(exp, cid, data_path) if data_path else None
    session = ClientEnv.build(exp, Workbench(exp, federation), build_algorithm(exp), ClientStore(store_dir))
    if keep:
        _SESSIONS.clear()  # one run at a time per process: drop another run's model
        _SESSIONS[cache_key] = session
    return session


def default_store_dir(key: str) -> Path:
    base = Path(os.environ.get("FEDFM_CLIENT_STORE", Path.home() / ".cache" / "fedfm" / "client-store"))
    return base / key
