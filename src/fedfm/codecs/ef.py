"""Error feedback (Stich, Cordonnier and Jaggi 2018, "Sparsified SGD with Memory"):
what a compressor drops is remembered and added to the next update, so every coordinate's
mass eventually travels. The memory is per client and per direction, in the disk-backed
client store (``ClientStore``), never in RAM across clients.

    u_t   = update_t + e_t          (corrected update)
    sent  = C(u_t)                  (what the sparsifier keeps)
    e_t+1 = u_t - sent              (the residual, stored)
"""

from __future__ import annotations

import torch

from fedfm.codecs.base import CodecContext, CodecError


class ErrorFeedback:
    def __init__(self, key: str):
        self.key = key

    def _check(self, ctx: CodecContext) -> None:
        if ctx.store is None or ctx.cid is None:
            raise CodecError(f"error feedback ({self.key}) needs a client store and a client id in the codec context")

    def load(self, ctx: CodecContext) -> dict[str, torch.Tensor]:
        self._check(ctx)
        return ctx.store.get(ctx.cid, self.key) or {}

    def correct(self, name: str, x: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        """x + e for tensor ``name`` (a residual of another shape is ignored: the State changed)."""
        e = memory.get(name)
        if e is None or e.shape != x.shape:
            return x
        return x + e.to(x.dtype)

    def save(self, ctx: CodecContext, residuals: dict[str, torch.Tensor]) -> None:
        self._check(ctx)
        ctx.store.put(ctx.cid, self.key, residuals)
