"""One explicit registry per extension point.

Every component is registered under a YAML name together with a pydantic model of its
parameters, so a config such as ``peft: {method: lora, r: 8}`` is validated against the
component's own schema before anything loads, and errors name the offending key. A
float that is inf or NaN is refused in every component's parameters (``gt=0`` lets inf
through: a learning rate, noise scale or deadline of inf passed and broke the run later).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fedfm.core.hints import key_hint

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown component name or invalid component parameters."""


class NoParams(BaseModel):
    """Parameters of a component that takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    params: type[BaseModel]
    doc: str


class Registry(Generic[T]):
    """Name -> (object, params schema). ``kind`` is the YAML key, e.g. ``peft.method``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, obj: T, params: type[BaseModel] = NoParams, doc: str = "") -> T:
        if name in self._entries:
            raise RegistryError(f"{self.kind}: '{name}' is already registered")
        self._entries[name] = Entry(name, obj, params, doc or (getattr(obj, "__doc__", "") or "").strip())
        return obj

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise RegistryError(
                f"{self.kind}: unknown name '{name}'; known: {', '.join(self.names()) or '(none)'}"
            )
        return self._entries[name]

    def parse(self, name: str, params: dict[str, Any], where: str) -> BaseModel:
        """Validate ``params`` for component ``name``; errors name ``where.<field>``."""
        entry = self.get(name)
        try:
            parsed = entry.params(**params)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                msg = err["msg"] + key_hint(entry.params, err)
                lines.append(f"{where}.{loc}: {msg}" if loc else f"{where}: {msg}")
            raise RegistryError("; ".join(lines)) from None
        bad = [".".join(loc) for loc in non_finite(parsed.model_dump())]
        if bad:
            raise RegistryError("; ".join(f"{where}.{loc}: Input should be a finite number" for loc in bad))
        return parsed


def non_finite(value: Any, loc: tuple[str, ...] = ()):
    """The locations of inf and NaN floats in a dumped parameter model."""
    if isinstance(value, float) and not math.isfinite(value):
        yield loc
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from non_finite(v, (*loc, str(k)))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from non_finite(v, (*loc, str(i)))


def registered(registry: Registry[Callable[..., Any]], name: str, params: type[BaseModel] = NoParams):
    """Decorator form of ``registry.register``."""

    def deco(obj):
        registry.register(name, obj, params)
        return obj

    return deco


def parse_named(registry: Registry, spec: Any, where: str, example: str) -> tuple[str, BaseModel]:
    """``{name: NAME, ...params}`` -> (NAME, validated params): the YAML form of server
    steps, client middleware and exchanges; errors name ``where``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise RegistryError(f"{where}: expected a mapping with a 'name', e.g. {example}")
    return spec["name"], registry.parse(spec["name"], {k: v for k, v in spec.items() if k != "name"}, where)
