"""The registry of extra exchange phases (``core.protocols.ExchangePhase``).

A registered factory takes its validated params and returns the phases it adds to every
round, in order (e.g. secure aggregation: two before training, one after). YAML:
``exchanges: [{name: NAME, ...params}]``; register with ``register_exchange``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from pydantic import BaseModel

from fedfm.core.protocols import PHASE_MEMBERS, ExchangePhase
from fedfm.core.registry import NoParams, Registry, RegistryError, parse_named

ExchangeFactory = Callable[[BaseModel], Sequence[ExchangePhase]]
exchanges: Registry[ExchangeFactory] = Registry("exchanges")


def register_exchange(name: str, factory: ExchangeFactory, params: type[BaseModel] = NoParams) -> ExchangeFactory:
    return exchanges.register(name, factory, params)


def parse_exchange(spec: dict[str, Any], where: str) -> tuple[str, BaseModel]:
    return parse_named(exchanges, spec, where, "{name: secagg}")


def check_phases(phases: Sequence[ExchangePhase], where: str) -> list[ExchangePhase]:
    """``phases``, once each declares every ``ExchangePhase`` member (None for an unused hook)."""
    for phase in phases:
        missing = [m for m in PHASE_MEMBERS if not hasattr(phase, m)]
        if missing:
            raise RegistryError(f"{where}: exchange phase {type(phase).__name__} lacks {missing}: derive it from "
                                "fedfm.core.protocols.ExchangePhaseBase, or declare them (None for an unused hook)")
    return list(phases)


def build_phases(specs: Sequence[dict[str, Any]], where: str = "exchanges") -> list[ExchangePhase]:
    phases: list[ExchangePhase] = []
    for i, spec in enumerate(specs):
        name, params = parse_exchange(spec, f"{where}[{i}]")
        phases.extend(check_phases(exchanges.get(name).obj(params), f"{where}[{i}] ({name})"))
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise RegistryError(f"{where}: two phases share a name: {names}")
    return phases
