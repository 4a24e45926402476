"""The disk-backed client state store: per-client state never all in RAM.

One safetensors file per (client, key), e.g. SCAFFOLD control variates or error-feedback
residuals, under ``root/<cid>/<key>.safetensors``; writes are atomic (temp file + rename),
so a run killed mid-write never leaves a half-written file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedfm.core.types import State


class ClientStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: int, key: str) -> Path:
        if not key.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"client store key '{key}' must be alphanumeric (with - or _)")
        return self.root / str(int(cid)) / f"{key}.safetensors"

    def get(self, cid: int, key: str) -> State | None:
        path = self._path(cid, key)
        return load_file(str(path)) if path.exists() else None

    def put(self, cid: int, key: str, state: State) -> None:
        path = self._path(cid, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)

    def delete(self, cid: int, key: str) -> None:
        self._path(cid, key).unlink(missing_ok=True)

    def keys(self, cid: int) -> list[str]:
        d = self.root / str(int(cid))
        return sorted(p.stem for p in d.glob("*.safetensors")) if d.exists() else []
