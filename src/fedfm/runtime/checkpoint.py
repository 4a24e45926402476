"""Checkpoints after every round, and resuming from the last complete one.

``DIR/checkpoints/round-000007/`` holds ``state.safetensors`` (the server state's
``model`` group: the global shared State), ``algorithm.safetensors`` (every other group,
flattened as ``group/name``: server optimizer moments, control variates, server steps'
state such as ``dp_noise``'s sigmas), ``rng.safetensors`` (torch's global CPU generator state) and ``checkpoint.json``:
the round number and the python and numpy RNG states (written here), plus the caller's
``info``. The round loop's ``info`` (``runtime/loop.py``) is the config less ``rounds``,
``runtime`` and ``name``, its digest (``config_digest``), the ``runtime`` section apart
(``math_lever_changes``), torch's thread count, the
backend, and the clients' outcomes: for each client the tag of its last staged round and
whether the server accepted it (``client_outcomes``, sent with the client's next message
so its store settles), and this round's, for the server's mirror store
(``mirror_outcomes``). No running totals are stored: bytes, wall time and the metrics
rows of a resumed run come from ``metrics.jsonl`` (``runtime/outputs.py``).

A resume compares ``config_digest``: every key but ``RESUMABLE_CHANGES`` must be unchanged.
``rounds`` may change (a finished run continued for more rounds), except where a step
planned for the run's rounds: ``dp_noise`` with ``target_epsilon`` refuses a changed
``rounds`` itself, from the plan recorded in its state (``privacy/noise.py``).

The directory is written as ``round-000007.tmp`` and renamed when complete, so the rename
is the commit point: a run killed at any moment leaves either the previous checkpoint or
the new one, never a mix. Older checkpoints are then pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedfm.core.types import State

PREFIX = "round-"
# Sections that may change between a run and its resumption (more rounds, other threads).
RESUMABLE_CHANGES = ("rounds", "runtime", "name", "tracking")


@dataclass
class Checkpoint:
    round: int
    state: State
    algorithm: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def config_changes(old: Any, new: Any, path: str = "") -> list[str]:
    """Where two config dumps differ, as dotted paths with both values (mappings compared key
    by key, lists and values whole; each value cut to 60 characters), e.g.
    ``federation.roles: was [...], now [...]``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                out += config_changes(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out

    def shown(v: Any) -> str:
        text = "(unset)" if v is None else repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{path or 'the config'}: was {shown(old)}, now {shown(new)}"]


def math_lever_changes(old: dict, new: dict) -> list[str]:
    """The ``runtime`` changes of a resume that change the float math from the resumed round
    on (docs/speed.md, "Resuming with other levers"): the device, the batched transport
    (wider batches, other dropout masks) or its settings. ``sequential`` and ``processes``
    train every client with the same bits (the thread count is checked on its own). The
    round loop records and passes the device as it resolved (``runtime/loop.py``); given
    ``auto``, a device now is compared as it resolves here (``cpu`` then ``auto`` on a
    machine without a GPU is the same device), and one recorded as ``auto`` (a checkpoint
    that kept the setting, not the device) is not compared. To or
    from ``processes``, a change of the threads each client trains with (its workers'
    ``threads_per_worker`` against ``threads``) is named too: the loop's own thread check
    sees the run's process only."""
    keys = ["device"]
    if "batched" in (old.get("transport"), new.get("transport")):
        keys += ["transport", "batch_clients", "batch_kernel"]
    same = {}
    if new.get("device") == "auto" and old.get("device") in ("cpu", "cuda"):  # auto as it resolves here
        same["device"] = old["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if old.get("device") == "auto":  # which device it was is not recorded
        same["device"] = True
    changes = [c for k in keys if k in old and old.get(k) != new.get(k) and not same.get(k)
               for c in config_changes(old[k], new.get(k), f"runtime.{k}")]
    if "processes" in (old.get("transport"), new.get("transport")) and "batched" not in (old.get("transport"), new.get("transport")):
        was, now = _client_threads(old), _client_threads(new)
        if was is not None and now is not None and was != now:
            changes.append(f"each client trained with {was} torch thread(s), now {now} ({_threads_key(old)} {was}, "
                           f"{_threads_key(new)} {now})")
    return changes


def _threads_key(rt: dict) -> str:
    return "runtime.threads_per_worker" if rt.get("transport") == "processes" else "runtime.threads"


def _client_threads(rt: dict) -> int | None:
    """The torch threads each client trains with under the ``runtime`` settings ``rt``: a
    worker's (and the parent's, with parent_trains) on ``processes``, else ``threads`` (None:
    torch's default, which the settings do not say)."""
    if rt.get("transport") == "processes":
        return rt.get("threads_per_worker", 1)
    return rt.get("threads")


def config_digest(exp) -> str:
    """Hash of the config minus the keys a resumed run may change."""
    d = {k: v for k, v in exp.dump().items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def rng_snapshot() -> tuple[dict[str, Any], torch.Tensor]:
    """(JSON-able python + numpy states, torch CPU generator state)."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    info = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return info, torch.get_rng_state()


def rng_restore(info: dict[str, Any], torch_state: torch.Tensor) -> None:
    v, internal, gauss = info["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class Checkpointer:
    def __init__(self, out: str | Path, keep: int = 1):
        self.dir = Path(out) / "checkpoints"
        self.keep = keep

    def rounds(self) -> list[int]:
        if not self.dir.exists():
            return []
        found = []
        for p in self.dir.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
                if (p / "checkpoint.json").exists():
                    found.append(int(p.name[len(PREFIX):]))
        return sorted(found)

    def save(self, rnd: int, state: State, algorithm: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"{PREFIX}{rnd:06d}"
        tmp = self.dir / f"{PREFIX}{rnd:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        rng_info, torch_rng = rng_snapshot()
        _save(state, tmp / "state.safetensors")
        _save(algorithm, tmp / "algorithm.safetensors")
        _save({"torch": torch_rng}, tmp / "rng.safetensors")
        body = {"round": rnd, "rng": rng_info, **info}
        (tmp / "checkpoint.json").write_text(json.dumps(body, indent=1))
        for name in ("state.safetensors", "algorithm.safetensors", "rng.safetensors", "checkpoint.json"):
            _fsync(tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the commit point
        self.prune()
        return final

    def prune(self) -> None:
        for rnd in self.rounds()[: -self.keep]:
            shutil.rmtree(self.dir / f"{PREFIX}{rnd:06d}", ignore_errors=True)
        for p in self.dir.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(p, ignore_errors=True)

    def load_latest(self) -> Checkpoint | None:
        """The last complete checkpoint, with the RNG states restored; None if there is none."""
        rounds = self.rounds()
        if not rounds:
            return None
        d = self.dir / f"{PREFIX}{rounds[-1]:06d}"
        info = json.loads((d / "checkpoint.json").read_text())
        rng_restore(info["rng"], load_file(str(d / "rng.safetensors"))["torch"])
        return Checkpoint(
            round=int(info["round"]),
            state=load_file(str(d / "state.safetensors")),
            algorithm=load_file(str(d / "algorithm.safetensors")),
            info=info,
        )

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
