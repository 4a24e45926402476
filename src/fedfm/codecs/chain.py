"""A chain of codec stages, ending in safetensors serialization."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedfm.codecs.base import CodecContext, CodecError, Payload, Stage, build_stage
from fedfm.codecs.serialize import from_bytes, to_bytes
from fedfm.core.types import State


@dataclass
class Encoded:
    data: bytes
    stage_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.data)


class CodecChain:
    def __init__(self, stages: list[Stage]):
        self.stages = stages

    @classmethod
    def from_specs(cls, specs: list[dict], where: str) -> "CodecChain":
        return cls([build_stage(s, f"{where}[{i}]") for i, s in enumerate(specs)])

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def encode(self, state: State, meta: dict[str, str], ctx: CodecContext) -> Encoded:
        payload = Payload(dict(state), dict(meta))
        for stage in self.stages:
            payload = stage.encode(payload, ctx)
        return Encoded(to_bytes(payload))

    def decode(self, data: bytes, ctx: CodecContext) -> tuple[State, dict[str, str]]:
        payload = from_bytes(data)
        for stage in reversed(self.stages):
            payload = stage.decode(payload, ctx)
        ref = ctx.reference
        if set(payload.tensors) != set(ref):
            missing = sorted(set(ref) - set(payload.tensors))[:3]
            extra = sorted(set(payload.tensors) - set(ref))[:3]
            raise CodecError(f"decoded payload names do not match the State: missing {missing}, unexpected {extra}")
        for k, t in payload.tensors.items():
            if tuple(t.shape) != tuple(ref[k].shape):
                raise CodecError(f"decoded tensor '{k}' has shape {tuple(t.shape)}, expected {tuple(ref[k].shape)}")
        state = {k: payload.tensors[k].to(ref[k].dtype) for k in ref}
        return state, payload.meta
