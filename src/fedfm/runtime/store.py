"""The disk-backed client state store: per-client state never all in RAM.

One safetensors file per (client, key), e.g. SCAFFOLD control variates, error-feedback
residuals or a client's local (personal) parameters, under ``root/<cid>/<key>.safetensors``;
every file write is atomic (temp file + rename), so a killed run never leaves a half file.

Writes are staged per client under a *tag* (``r<round>a<attempt>``): after
``stage(cid, tag)`` that client's writes and deletions go to ``root/.pending/<cid>/<tag>/``
(reads see them: read-your-writes). Whether they count is decided later, by the server,
and delivered with the next message to that client: ``settle(cid, tag, accepted)`` moves
the named tag's writes into place if the update was accepted and drops every other pending
tag of that client (a rejected, failed or timed-out update; a round redone after a resume).
The same store, settled by the loop right after each checkpoint, keeps the server's mirror
of what each client last received (the downlink ``delta`` stage).

So the store behaves the same wherever it lives: in the run directory (local backend and
Flower simulation) or on a data owner's machine (deployment), where the server cannot
reach it and only its decisions travel.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedfm.core.types import State

PENDING = ".pending"
TOMBSTONE = ".deleted"


def round_tag(rnd: int, attempt: int = 0) -> str:
    return f"r{int(rnd)}a{int(attempt)}"


class ClientStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.current: dict[int, str] = {}

    # -- paths ----------------------------------------------------------------------

    @staticmethod
    def _check_key(key: str) -> None:
        if not key.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"client store key '{key}' must be alphanumeric (with - or _)")

    def _committed(self, cid: int, key: str) -> Path:
        self._check_key(key)
        return self.root / str(int(cid)) / f"{key}.safetensors"

    def _pending_root(self, cid: int) -> Path:
        return self.root / PENDING / str(int(cid))

    def _staged(self, cid: int, key: str) -> Path | None:
        tag = self.current.get(int(cid))
        if tag is None:
            return None
        self._check_key(key)
        return self._pending_root(cid) / tag / f"{key}.safetensors"

    # -- the four operations learners and codecs use ---------------------------------

    def get(self, cid: int, key: str) -> State | None:
        staged = self._staged(cid, key)
        if staged is not None:
            if staged.with_suffix(TOMBSTONE).exists():
                return None
            if staged.exists():
                return load_file(str(staged))
        path = self._committed(cid, key)
        return load_file(str(path)) if path.exists() else None

    def read_into(self, cid: int, key: str, target: State) -> bool:
        """Copy the stored tensors into ``target``'s tensors in place, one tensor at a time
        (a large State is never held twice); False when nothing is stored. The names and
        shapes must match ``target``'s exactly."""
        from safetensors import safe_open

        path = self._staged(cid, key)
        if path is None or not path.exists():
            if path is not None and path.with_suffix(TOMBSTONE).exists():
                return False
            path = self._committed(cid, key)
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(target):
                raise KeyError(f"store {cid}/{key}: holds {sorted(names - set(target))[:3]} beyond, and lacks "
                               f"{sorted(set(target) - names)[:3]} of, the target's names")
            with torch.no_grad():
                for name in sorted(names):
                    t = f.get_tensor(name)
                    if tuple(t.shape) != tuple(target[name].shape):
                        raise ValueError(f"store {cid}/{key}: '{name}' has shape {tuple(t.shape)}, "
                                         f"the target {tuple(target[name].shape)}")
                    target[name].copy_(t)
        return True

    def put(self, cid: int, key: str, state: State) -> None:
        path = self._staged(cid, key) or self._committed(cid, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(TOMBSTONE).unlink(missing_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)

    def delete(self, cid: int, key: str) -> None:
        staged = self._staged(cid, key)
        if staged is None:
            self._committed(cid, key).unlink(missing_ok=True)
            return
        staged.unlink(missing_ok=True)
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.with_suffix(TOMBSTONE).touch()

    def keys(self, cid: int) -> list[str]:
        found = {p.stem for p in (self.root / str(int(cid))).glob("*.safetensors")}
        tag = self.current.get(int(cid))
        if tag is not None and (self._pending_root(cid) / tag).exists():
            d = self._pending_root(cid) / tag
            found |= {p.stem for p in d.glob("*.safetensors")}
            found -= {p.stem for p in d.glob(f"*{TOMBSTONE}")}
        return sorted(found)

    # -- staging and settling ------------------------------------------------------

    def stage(self, cid: int, tag: str, fresh: bool = True) -> None:
        """Stage client ``cid``'s writes under ``tag``. ``fresh``: the first message of a
        round attempt, so leftovers of that tag (a run killed and resumed) are dropped;
        a later phase of the same attempt keeps what the earlier ones staged."""
        if fresh:
            shutil.rmtree(self._pending_root(cid) / tag, ignore_errors=True)
        self.current[int(cid)] = tag

    def settle(self, cid: int, tag: str | None, accepted: bool) -> None:
        """Apply the server's decision on ``tag``: move its writes into place if accepted;
        drop every other pending tag of the client. Idempotent."""
        cid = int(cid)
        self.current.pop(cid, None)
        root = self._pending_root(cid)
        if not root.exists():
            return
        if tag is not None and accepted and (root / tag).exists():
            self._apply(cid, root / tag)
        shutil.rmtree(root, ignore_errors=True)

    def _apply(self, cid: int, staged: Path) -> None:
        target = self.root / str(cid)
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(staged.glob("*.safetensors")):
            os.replace(f, target / f.name)
        for t in sorted(staged.glob(f"*{TOMBSTONE}")):
            (target / (t.stem + ".safetensors")).unlink(missing_ok=True)

    def settle_all(self, outcomes: dict[int, tuple[str, bool]]) -> None:
        """Settle every client named in ``outcomes``, then drop all other pending writes
        (the server's mirror on resume: nothing staged after the checkpoint survives)."""
        for cid, (tag, accepted) in sorted(outcomes.items()):
            self.settle(cid, tag, accepted)
        shutil.rmtree(self.root / PENDING, ignore_errors=True)
        self.current.clear()

    def pending_tags(self, cid: int) -> list[str]:
        root = self._pending_root(cid)
        return sorted(p.name for p in root.iterdir()) if root.exists() else []

    def clear(self) -> None:
        """Remove every client's state (a fresh run in a directory the user let us reuse)."""
        self.current.clear()
        for p in self.root.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
