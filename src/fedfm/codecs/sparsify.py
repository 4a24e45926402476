"""Sparsification of what travels: top-k, random-k and threshold, with optional error
feedback.

- ``topk`` keeps the k entries of largest magnitude of each tensor (``fraction`` of its
  elements, or a fixed ``count``); equal magnitudes go to the lowest index (as a stable
  sort of -|x| cut after k: ``ones(5)``, k = 2 keeps indices 0 and 1); with ``error_feedback: true`` the dropped mass is kept
  per client and added to the next update (Stich, Cordonnier and Jaggi 2018, "Sparsified
  SGD with Memory"; see codecs/ef.py).
- ``randk`` keeps k entries drawn uniformly at random from a generator seeded by
  (seed, round, client, direction, tensor name): the receiver draws the same indices, so
  only the values travel (Stich et al. 2018 analyse rand-k with memory as well).
- ``threshold``: Strom-inspired threshold sparsification (exact values, not +-tau). It
  keeps every entry with ``|x| >= threshold`` and sends its exact value. Strom 2015
  ("Scalable distributed DNN training using commodity GPU cloud computing") selects the
  same entries but sends each as +-tau (its sign only, packed with its index in one
  32-bit word) and always keeps the remainder, ``x - (+-tau)`` for sent entries and ``x``
  for the others, as a residual added to the next gradient. Here the residual exists only
  with ``error_feedback: true``, and then it is exactly the entries not sent.

Each acts on dense floating tensors only (see codecs/layout.py) and sends each one in the
cheapest of its sparse wire forms (codecs/sparse_format.py).
"""

from __future__ import annotations

from pydantic import Field, model_validator

import torch

from fedfm.codecs.base import CodecContext, CodecError, Payload, StageParams, register_codec
from fedfm.codecs.ef import ErrorFeedback
from fedfm.codecs.layout import SEP, is_dense_float, reference_numel, tensor_generator
from fedfm.codecs.skip_zero import skipped, with_skipped
from fedfm.codecs.sparse_format import BITMAP, DELTA, VALUES, decode_indices, densify, encode_sparse

RANDK_SALT = 0x5AA5


class SparsifyParams(StageParams):
    error_feedback: bool = Field(False, description="keep the dropped mass per client and add it to the next update (codecs.up only)")

    def direction_problem(self, direction: str) -> str | None:
        if direction == "down" and self.error_feedback:
            return (
                "error_feedback is for codecs.up only: the broadcast is the State, not an update, so a residual "
                "would add dropped State values again every round; put {delta: true} first in codecs.down instead "
                "(each delta is taken against what the client reconstructed, which corrects the loss)"
            )
        return None


class TopKParams(SparsifyParams):
    primary = "fraction"
    fraction: float | None = Field(None, gt=0, le=1, description="share of each tensor's entries kept")
    count: int | None = Field(None, ge=1, description="entries kept per tensor (instead of fraction)")

    @model_validator(mode="after")
    def _one(self):
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of fraction or count")
        return self

    def k(self, n: int) -> int:
        if self.count is not None:
            return min(self.count, n)
        return max(1, min(n, int(self.fraction * n + 0.5)))


class ThresholdParams(SparsifyParams):
    primary = "threshold"
    threshold: float = Field(..., ge=0, description="entries with |x| >= threshold are kept")


class Sparsifier:
    """Shared encode/decode; subclasses choose the kept indices (sorted, int64)."""

    name = "sparsify"
    send_index = True

    def __init__(self, params: SparsifyParams):
        self.params = params

    def select(self, x: torch.Tensor, key: str, ctx: CodecContext) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, payload: Payload, ctx: CodecContext) -> Payload:
        ef = ErrorFeedback(f"ef_{ctx.direction}_{self.name}") if self.params.error_feedback else None
        memory = ef.load(ctx) if ef else {}
        revived = ef.revive(payload.meta, memory, ctx) if ef else {}  # skipped as zero, residual left
        out: dict[str, torch.Tensor] = {}
        residuals: dict[str, torch.Tensor] = {}
        for key, t in {**payload.tensors, **revived}.items():
            if not is_dense_float(key, t):
                out[key] = t
                continue
            x = ef.correct(key, t, memory).reshape(-1) if ef else t.reshape(-1)  # (n,)
            idx = self.select(x, key, ctx)  # (k,) sorted
            if key in revived and idx.numel() == 0:
                del revived[key]  # nothing to send yet: it stays skipped, its residual kept
                continue
            values = x[idx]  # (k,)
            if ef:
                residual = x.clone()
                residual[idx] = 0
                residuals[key] = residual.reshape(t.shape)
            out.update(encode_sparse(key, values, idx, tuple(t.shape), self.send_index))
        meta = dict(payload.meta)
        if revived:
            meta = with_skipped(meta, [k for k in skipped(meta) if k not in revived])
        if ef:
            ef.save(ctx, memory, residuals)
        return Payload(out, meta)

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        tensors = payload.tensors
        names = _sparse_names(tensors)
        owned = {name + part for name in names for part in (VALUES, BITMAP, DELTA)}
        out = {k: v for k, v in tensors.items() if k not in owned}
        for name in names:
            if name in out:
                raise CodecError(f"'{name}' arrived both dense and sparse (corrupted payload)")
            values = tensors[name + VALUES]
            if values.dim() != 1 or not values.is_floating_point():
                raise CodecError(f"'{name}{VALUES}' must be a 1-D floating tensor")
            n, shape = reference_numel(ctx, name)
            idx = decode_indices(name, tensors, n, values.numel())
            if idx is None:
                idx = self.redraw(name, n, values.numel(), ctx)
            out[name] = densify(values, idx, n, shape)
        return Payload(out, dict(payload.meta))

    def redraw(self, name: str, n: int, k: int, ctx: CodecContext) -> torch.Tensor:
        raise CodecError(f"'{name}': sparse values arrived without indices ({self.name} always sends them)")


def _sparse_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(VALUES)] for k in tensors if k.endswith(VALUES) and k.count(SEP) == 1)


class TopK(Sparsifier):
    name = "topk"

    def select(self, x, key, ctx):
        return topk_indices(x, self.params.k(x.numel()))


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest |x|, ties to the lowest index (NaN counts as the
    largest, so a NaN update still reaches the server's finiteness check).

    The same set as a stable sort of -|x| cut after k, without the O(n log n) sort: the
    k-th largest magnitude ``t`` comes from ``torch.topk``, then every entry above ``t``
    and the first entries equal to ``t`` are kept (``torch.topk`` alone breaks ties in an
    implementation-defined order).
    """
    a = torch.where(torch.isnan(x), torch.inf, x.abs())  # (n,)
    if k >= a.numel():
        return torch.arange(a.numel())
    t = torch.topk(a, k, sorted=False).values.min()
    above = (a > t).nonzero().reshape(-1)  # (< k,)
    ties = (a == t).nonzero().reshape(-1)[: k - above.numel()]  # lowest indices first
    return torch.cat([above, ties]).sort().values  # (k,)


class RandomK(Sparsifier):
    name = "randk"
    send_index = False

    def _draw(self, name: str, n: int, k: int, ctx: CodecContext) -> torch.Tensor:
        g = tensor_generator(ctx, RANDK_SALT, name)
        return torch.randperm(n, generator=g)[:k].sort().values  # (k,)

    def select(self, x, key, ctx):
        return self._draw(key, x.numel(), self.params.k(x.numel()), ctx)

    def redraw(self, name, n, k, ctx):
        if k != self.params.k(n):
            raise CodecError(f"'{name}': {k} values arrived, random-k expects {self.params.k(n)} (corrupted payload)")
        return self._draw(name, n, k, ctx)


class Threshold(Sparsifier):
    name = "threshold"

    def select(self, x, key, ctx):
        keep = (x.abs() >= self.params.threshold) | torch.isnan(x)  # a NaN travels, to be refused
        return keep.nonzero().reshape(-1)  # (k,) sorted


register_codec("topk", TopK, TopKParams)
register_codec("randk", RandomK, TopKParams)
register_codec("threshold", Threshold, ThresholdParams)
