"""Skip all-zero tensors: a lossless stage for payloads whose untouched parts are exact zeros.

A learner that trains only part of its State in a round (DiPrompT's domain prompts a
client did not use, ``personalize/diprompt.py``; the layers a FedBFPT client does not
train in a round) sends exact-zero deltas for the rest. ``{skip_zero: true}`` drops every tensor
whose entries are all exactly zero and lists the dropped names in the metadata
(``__zero``, names joined by ``;``); decoding restores them as zeros with the shape and
dtype of the reference State. Nothing else changes, so the bytes on the wire count only
the tensors that moved. Put it first in the chain, before stages that would make a zero
tensor non-zero (none of the lossless ones do).
"""

from __future__ import annotations

import torch

from fedfm.codecs.base import CodecContext, CodecError, Payload, register_codec

ZERO_META = "__zero"


class SkipZero:
    name = "skip_zero"

    def __init__(self, params=None):
        self.params = params

    def encode(self, payload: Payload, ctx: CodecContext) -> Payload:
        zero = sorted(k for k, t in payload.tensors.items() if t.numel() and not bool(t.any()))
        tensors = {k: t for k, t in payload.tensors.items() if k not in set(zero)}
        meta = dict(payload.meta)
        if zero:
            meta[ZERO_META] = ";".join(zero)
        return Payload(tensors, meta)

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
