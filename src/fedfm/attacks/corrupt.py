"""``corrupt``: a client that sends a broken update (NaN, Inf, a wrong shape, an extra
tensor, or a weight of zero examples), to exercise the server's validation (``runtime/validate.py``): such an update
must be rejected and recorded, the round going on with the others.

    federation:
      roles: [{name: broken, cids: [1], middleware: [{name: corrupt, kind: nan}]}]
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from fedfm.learners.middleware import PassThrough, register_middleware


class CorruptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["nan", "inf", "shape", "extra", "zero_weight"] = "nan"


def corrupt_payload(payload: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    out = dict(payload)
    first = sorted(out)[0]
    t = out[first].clone()
    if kind == "nan":
        t.view(-1)[0] = float("nan")
    elif kind == "inf":
        t.view(-1)[0] = float("inf")
    elif kind == "shape":
        t = torch.cat([t.view(-1), t.view(-1)[:1]])
    else:
        out["corrupt.extra"] = torch.zeros(1)
    out[first] = t
    return out


class Corrupt(PassThrough):
    name = "corrupt"

    def __init__(self, params: CorruptParams):
        self.kind = params.kind

    def after_train(self, update, ctx):
        if self.kind == "zero_weight":  # survives any lossy codec: the weight travels as metadata
            return replace(update, num_examples=0)
        return replace(update, payload=corrupt_payload(update.payload, self.kind))


register_middleware("corrupt", Corrupt, CorruptParams)
