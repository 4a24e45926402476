"""Half-precision casting of what travels: float32 -> float16 or bfloat16 (2 bytes per
entry instead of 4); decoding casts back to the reference State's dtype. fp16 keeps 10
mantissa bits over a narrow range (Micikevicius et al. 2018, "Mixed Precision
Training"); bf16 keeps float32's range with 7 mantissa bits (Kalamkar et al. 2019,
"A Study of BFLOAT16 for Deep Learning Training").

``{fp16: true}``, ``{bf16: true}`` or ``{cast: bfloat16}``. Every float32 tensor of the
payload is cast (dense tensors, sparse values, quantization scales).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedfm.codecs.base import CodecContext, Payload, StageParams, register_codec

TARGETS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
CAST_META = "__cast"


class CastParams(StageParams):
    primary = "dtype"
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="wire dtype of float32 tensors")


class Cast:
    name = "cast"

    def __init__(self, params: CastParams):
        self.params = params
        self.target = TARGETS[params.dtype]

    def encode(self, payload: Payload, ctx: CodecContext) -> Payload:
        out = {k: (t.to(self.target) if t.dtype == torch.float32 else t) for k, t in payload.tensors.items()}
        cast = sorted(k for k, t in payload.tensors.items() if t.dtype == torch.float32)
        meta = dict(payload.meta)
        if any(t.dtype == self.target for t in payload.tensors.values()):
            # Mixed payload: name exactly what was cast, so what already was half stays half.
            meta[CAST_META] = ";".join(cast)
        return Payload(out, meta)

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        meta = dict(payload.meta)
        listed = meta.pop(CAST_META, None)
        names = set(listed.split(";")) if listed else None
        out = {}
        for k, t in payload.tensors.items():
            if t.dtype == self.target and (names is None or k in names):
                t = t.to(torch.float32)
            out[k] = t
        return Payload(out, meta)


def _fixed(dtype: str):
    def factory(params) -> Cast:
        stage = Cast(CastParams(dtype=dtype))
        stage.name = "fp16" if dtype == "float16" else "bf16"
        return stage

    return factory


register_codec("cast", Cast, CastParams)
register_codec("fp16", _fixed("float16"))
register_codec("bf16", _fixed("bfloat16"))
