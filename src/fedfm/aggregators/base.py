"""HOW THE SERVER COMBINES: aggregation rules over client deltas.

A rule is a pure function ``(state, deltas, weights, params) -> delta``: the server
state, the decoded client deltas, their weights (examples), and the rule's parameters.
The server then applies the combined delta to its state (``apply_delta``, or a server
optimizer), so robust rules and server optimizers compose freely.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from pydantic import BaseModel

from fedfm.core.registry import NoParams, Registry
from fedfm.core.types import State

Rule = Callable[[State, Sequence[State], Sequence[float], BaseModel], State]
aggregators: Registry[Rule] = Registry("aggregator.rule")


class TooFewUpdates(ValueError):
    """A rule was given fewer updates than it can combine (Krum below f + 3, Bulyan below
    4f + 3, multi-Krum below m, a trimmed mean that trims them all). The round loop never
    hands a rule a round this small (it retries or skips it, ``runtime/loop.py``); a server
    half that combines a group over its holders only gives that group a zero delta
    (``aggregators/holders.py``). ``fewest``: the fewest updates the rule combines."""

    def __init__(self, message: str, fewest: int):
        super().__init__(message)
        self.fewest = fewest


def register_aggregator(name: str, fn: Rule, params: type[BaseModel] = NoParams) -> Rule:
    return aggregators.register(name, fn, params)


def normalized(weights: Sequence[float]) -> torch.Tensor:
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if len(w) == 0 or w.sum() <= 0:
        raise ValueError("aggregation needs at least one update with a positive weight")
    return w / w.sum()


def apply_delta(state: State, delta: State) -> State:
    return {k: state[k] + delta[k].to(state[k].dtype) for k in state}
