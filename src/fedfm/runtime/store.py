"""The disk-backed client state store: per-client state never all in RAM.

One safetensors file per (client, key), e.g. SCAFFOLD control variates or error-feedback
residuals, under ``root/<cid>/<key>.safetensors``; every file write is atomic (temp file +
rename), so a run killed mid-write never leaves a half-written file behind.

Transactional by round, so that a resumed run never sees writes of a round it redoes:
after ``begin(round)`` writes and deletions go to ``root/.pending-<round>/`` (reads see
them: read-your-writes), ``discard(cid)`` drops one client's pending writes (a client that
failed or was rejected), and ``commit(round)`` moves them into place once the round's
checkpoint is on disk. ``recover(round)`` on resume rolls forward the pending writes of
rounds the checkpoint covers (a commit cut short) and discards those of later rounds.
Without ``begin`` the store writes straight through.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedfm.core.types import State

PENDING = ".pending-"
TOMBSTONE = ".deleted"


class ClientStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.round: int | None = None

    # -- paths ----------------------------------------------------------------------

    @staticmethod
    def _check_key(key: str) -> None:
        if not key.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"client store key '{key}' must be alphanumeric (with - or _)")

    def _path(self, cid: int, key: str, base: Path | None = None) -> Path:
        self._check_key(key)
        return (base or self.root) / str(int(cid)) / f"{key}.safetensors"

    def _pending_dir(self, rnd: int) -> Path:
        return self.root / f"{PENDING}{rnd}"

    def _pending(self) -> Path | None:
        return None if self.round is None else self._pending_dir(self.round)

    # -- the four operations learners use -------------------------------------------

    def get(self, cid: int, key: str) -> State | None:
        pending = self._pending()
        if pending is not None:
            p = self._path(cid, key, pending)
            if p.with_suffix(TOMBSTONE).exists():
                return None
            if p.exists():
                return load_file(str(p))
        path = self._path(cid, key)
        return load_file(str(path)) if path.exists() else None

    def put(self, cid: int, key: str, state: State) -> None:
        path = self._path(cid, key, self._pending())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(TOMBSTONE).unlink(missing_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)

    def delete(self, cid: int, key: str) -> None:
        pending = self._pending()
        if pending is None:
            self._path(cid, key).unlink(missing_ok=True)
            return
        path = self._path(cid, key, pending)
        path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(TOMBSTONE).touch()

    def keys(self, cid: int) -> list[str]:
        found = {p.stem for p in (self.root / str(int(cid))).glob("*.safetensors")}
        pending = self._pending()
        if pending is not None and (pending / str(int(cid))).exists():
            d = pending / str(int(cid))
            found |= {p.stem for p in d.glob("*.safetensors")}
            found -= {p.stem for p in d.glob(f"*{TOMBSTONE}")}
        return sorted(found)

    # -- transactions -----------------------------------------------------------------

    def begin(self, rnd: int) -> None:
        """Start staging the writes of round ``rnd`` (leftovers of an earlier try are dropped)."""
        self.round = int(rnd)
        shutil.rmtree(self._pending_dir(self.round), ignore_errors=True)

    def discard(self, cid: int) -> None:
        """Drop the staged writes of one client (its update was not used)."""
        pending = self._pending()
        if pending is not None:
            shutil.rmtree(pending / str(int(cid)), ignore_errors=True)

    def rollback(self) -> None:
        """Drop every staged write of the current round (e.g. before a retry)."""
        if self.round is not None:
            shutil.rmtree(self._pending_dir(self.round), ignore_errors=True)

    def commit(self, rnd: int) -> None:
        """Move the staged writes of round ``rnd`` into place; idempotent if cut short."""
        pending = self._pending_dir(rnd)
        if pending.exists():
            for cdir in sorted(p for p in pending.iterdir() if p.is_dir()):
                target = self.root / cdir.name
                target.mkdir(parents=True, exist_ok=True)
                for f in sorted(cdir.glob("*.safetensors")):
                    os.replace(f, target / f.name)
                for t in sorted(cdir.glob(f"*{TOMBSTONE}")):
                    (target / (t.stem + ".safetensors")).unlink(missing_ok=True)
                    t.unlink()
            shutil.rmtree(pending, ignore_errors=True)
        self._write_marker(rnd)
        if self.round == rnd:
            self.round = None

    def committed_round(self) -> int | None:
        marker = self.root / "COMMITTED.json"
        return json.loads(marker.read_text())["round"] if marker.exists() else None

    def _write_marker(self, rnd: int) -> None:
        tmp = self.root / "COMMITTED.json.tmp"
        tmp.write_text(json.dumps({"round": int(rnd)}))
        os.replace(tmp, self.root / "COMMITTED.json")

    def recover(self, complete_round: int) -> None:
        """Make the store match a checkpoint of ``complete_round`` (on resume)."""
        self.round = None
        for d in sorted(self.root.glob(f"{PENDING}*")):
            rnd = int(d.name[len(PENDING):])
            if rnd <= complete_round:
                self.commit(rnd)
            else:
                shutil.rmtree(d, ignore_errors=True)

    def clear(self) -> None:
        """Remove every client's state (a fresh run in a reused directory)."""
        self.round = None
        for p in self.root.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
