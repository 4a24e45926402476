"""HOW UPDATES TRAVEL: the codec contract, stage registry and spec parsing.

A codec stage transforms a ``Payload`` (named tensors + string metadata) on the way out
(``encode``) and back (``decode``). Stages chain in the order the config gives; the chain
always ends by serializing with safetensors, and the bytes counted on the wire are the
``len()`` of that serialization, never an estimate.

A stage is written in YAML as ``{name: topk, fraction: 0.1}`` or in the short form
``{topk: 0.1}``, where the value fills the parameter the stage declares as ``primary``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict

from fedfm.core.registry import Registry, RegistryError
from fedfm.core.types import State


class CodecError(ValueError):
    """A payload that cannot be decoded (truncated, corrupted, or of the wrong shape)."""


@dataclass
class Payload:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class CodecContext:
    """Where a payload travels: up (client -> server) or down; ``reference`` gives the
    names, shapes and dtypes of the State so that decoders can restore them."""

    direction: str
    round: int
    cid: int | None
    reference: State
    seed: int = 0
    store: Any = None


class Stage(Protocol):
    name: str

    def encode(self, payload: Payload, ctx: CodecContext) -> Payload: ...

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload: ...


class StageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    primary: ClassVar[str | None] = None

    def direction_problem(self, direction: str) -> str | None:
        """Why these parameters cannot work in ``codecs.<direction>`` (up or down), or None."""
        return None


StageFactory = Callable[[BaseModel], Stage]
codecs: Registry[StageFactory] = Registry("codecs")


def register_codec(name: str, factory: StageFactory, params: type[StageParams] = StageParams) -> StageFactory:
    return codecs.register(name, factory, params)


def parse_stage(spec: dict[str, Any], where: str) -> tuple[str, BaseModel]:
    """``{name: x, ...}`` or ``{x: primary_value, ...}`` -> (name, validated params)."""
    if not isinstance(spec, dict) or not spec:
        raise RegistryError(f"{where}: a codec stage must be a mapping such as {{name: fp16}}")
    spec = dict(spec)
    if "name" in spec:
        name = spec.pop("name")
    else:
        named = [k for k in spec if k in codecs.names()]
        if len(named) != 1:
            raise RegistryError(
                f"{where}: cannot tell the stage from keys {sorted(spec)}; "
                f"known stages: {', '.join(codecs.names())}"
            )
        name = named[0]
        primary = codecs.get(name).params.primary
        value = spec.pop(name)
        if primary is not None:
            spec[primary] = value
        elif value not in (None, True):
            raise RegistryError(f"{where}.{name}: this stage takes no short-form value")
    params = codecs.parse(name, spec, where)
    direction = where.split("[")[0].removeprefix("codecs.") if where.startswith("codecs.") else None
    problem = params.direction_problem(direction) if direction in ("up", "down") else None
    if problem is not None:
        raise RegistryError(f"{where}: {problem}")
    return name, params


def build_stage(spec: dict[str, Any], where: str) -> Stage:
    name, params = parse_stage(spec, where)
    return codecs.get(name).obj(params)
