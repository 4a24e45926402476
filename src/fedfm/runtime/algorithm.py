"""An Algorithm = configure / local_update / aggregate, composed from the config.

Backends call these three methods and nothing else, so one config runs unchanged on every
backend. Composition: a learner (client side), an aggregation rule and the server update.
"""

from __future__ import annotations

from typing import Sequence

from fedfm.aggregators import aggregators, apply_delta
from fedfm.core.types import ClientSpec, Instruction, State, Update
from fedfm.learners import build_learner
from fedfm.learners.base import LocalContext


class Algorithm:
    def __init__(self, exp):
        self.exp = exp
        self.learner = build_learner(exp.learner)
        spec = exp.aggregator
        self.rule = aggregators.get(spec.rule).obj
        self.rule_params = aggregators.parse(spec.rule, spec.params(), "aggregator")

    def configure(self, rnd: int, state: State, clients: Sequence[ClientSpec]) -> list[Instruction]:
        return [Instruction(round=rnd, cid=c.cid, state=state) for c in clients]

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        return self.learner.local_update(instruction, ctx)

    def aggregate(self, state: State, updates: Sequence[Update]) -> State:
        deltas = [u.payload for u in updates]
        weights = [float(u.num_examples) for u in updates]
        return apply_delta(state, self.rule(state, deltas, weights, self.rule_params))
