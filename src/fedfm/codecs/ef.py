"""Error feedback (Stich, Cordonnier and Jaggi 2018, "Sparsified SGD with Memory"):
what a compressor drops is remembered and added to the next update, so every coordinate's
mass eventually travels. The memory is per client and per direction, in the disk-backed
client store (``ClientStore``), never in RAM across clients.

    u_t   = update_t + e_t          (corrected update)
    sent  = C(u_t)                  (what the sparsifier keeps)
    e_t+1 = u_t - sent              (the residual, stored)

so ``sent + e_t+1 == update_t + e_t`` for every tensor, every round.

Tensors that are not in a round's payload keep their residual: the memory saved is the
old one with this round's residuals written over it (``save`` merges), so a tensor that
is absent for a round (its update is zero there: ``update_t = 0``, ``sent = 0``,
``e_t+1 = e_t``) gets its residual added when it comes back. A tensor that a
``skip_zero`` stage before the sparsifier dropped as all-zero (codecs/skip_zero.py) is
not left waiting: ``revive`` puts it back as ``0 + e_t`` when its residual is not spent,
so the residual of a part that stops training (a FedBFPT layer, an unused DiPrompT
prompt) still travels, a share per round, until it is all sent.
"""

from __future__ import annotations

import torch

from fedfm.codecs.base import CodecContext, CodecError
from fedfm.codecs.skip_zero import skipped


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

    def revive(self, meta: dict[str, str], memory: dict[str, torch.Tensor], ctx: CodecContext) -> dict[str, torch.Tensor]:
        """Zero tensors (reference shape and dtype) for the names skipped as all-zero whose
        residual is not spent: their update this round is zero, their residual is not."""
        out = {}
        for name in skipped(meta):
            ref, e = ctx.reference.get(name), memory.get(name)
            if ref is not None and ref.is_floating_point() and e is not None and e.shape == ref.shape and bool(e.any()):
                out[name] = torch.zeros(ref.shape, dtype=ref.dtype)
        return out

    def save(self, ctx: CodecContext, memory: dict[str, torch.Tensor], residuals: dict[str, torch.Tensor]) -> None:
        """Store this round's residuals over the old memory (absent tensors keep theirs)."""
        self._check(ctx)
        ctx.store.put(ctx.cid, self.key, {**memory, **residuals})
