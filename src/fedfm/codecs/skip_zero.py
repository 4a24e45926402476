"""Skip all-zero tensors: a lossless stage for payloads whose untouched parts are exact zeros.

A learner that trains only part of its State in a round (DiPrompT's domain prompts a
client did not use, ``personalize/diprompt.py``; the layers a FedBFPT client does not
train in a round) sends exact-zero deltas for the rest. ``{skip_zero: true}`` drops every
tensor that is still under its State name (a key of the reference State) and whose entries
are all exactly zero, and lists the dropped names in the metadata (``__zero``, names
joined by ``;``); decoding restores them as zeros with the shape and dtype of the
reference State. Nothing else changes, so the bytes on the wire count only the tensors
that moved.

It may stand anywhere in a chain: entries another stage made (``w.__values``,
``w.__delta``, ``w.__q``, compact's flat ``F32``) are never dropped, because decoding
could not restore them from the reference State. It saves the most first, before stages
that would make a zero tensor non-zero (quantization: a zero decodes to +-s/2).

With error feedback after it (``[skip_zero, {topk: 0.1, error_feedback: true}]``), a
tensor skipped as zero whose residual is not yet spent is taken back by the sparsifier
(its update is zero, so it sends part of the residual) and removed from ``__zero``: the
residual of a part that stops training still travels (codecs/ef.py).
"""

from __future__ import annotations

import torch

from fedfm.codecs.base import CodecContext, CodecError, Payload, register_codec

ZERO_META = "__zero"


def skipped(meta: dict[str, str]) -> list[str]:
    """The names a ``skip_zero`` stage before this point dropped as all-zero."""
    listed = meta.get(ZERO_META, "")
    return listed.split(";") if listed else []


def with_skipped(meta: dict[str, str], names: list[str]) -> dict[str, str]:
    """``meta`` listing exactly ``names`` as skipped (no entry when there are none)."""
    out = {k: v for k, v in meta.items() if k != ZERO_META}
    if names:
        out[ZERO_META] = ";".join(sorted(names))
    return out


class SkipZero:
    name = "skip_zero"

    def __init__(self, params=None):
        self.params = params

    def encode(self, payload: Payload, ctx: CodecContext) -> Payload:
        zero = sorted(
            k for k, t in payload.tensors.items() if k in ctx.reference and t.numel() and not bool(t.any())
        )
        tensors = {k: t for k, t in payload.tensors.items() if k not in set(zero)}
        return Payload(tensors, with_skipped(payload.meta, skipped(payload.meta) + zero))

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        meta = dict(payload.meta)
        listed = meta.pop(ZERO_META, "")
        tensors = dict(payload.tensors)
        for name in listed.split(";") if listed else []:
            if name in tensors:
                raise CodecError(f"'{name}' is listed as skipped (zero) but also sent")
            if name not in ctx.reference:
                raise CodecError(f"skipped tensor '{name}' is not in the reference State")
            ref = ctx.reference[name]
            tensors[name] = torch.zeros(ref.shape, dtype=ref.dtype)
        return Payload(tensors, meta)


register_codec("skip_zero", SkipZero)
