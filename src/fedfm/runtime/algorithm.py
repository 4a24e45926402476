"""An Algorithm = configure / local_update / aggregate, composed from the config.

Backends call these three methods and nothing else, so one config runs unchanged on every
backend. Composition: a learner (client side), an aggregation rule and the server update.
"""

from __future__ import annotations

from typing import Sequence

import torch

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

    def payload_reference(self, state: State) -> State:
        """Names and shapes of what a client sends (decoders check against it).

        Deltas over the State by default; algorithms that send more (control variates)
        or other things (seeds and scalars) return their own template here.
        """
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The server-side state of the algorithm (optimizer moments, control variates),
        checkpointed after every round next to the model State."""
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise KeyError(f"unexpected algorithm state: {sorted(tensors)[:3]}")

    def aggregate(self, state: State, updates: Sequence[Update]) -> State:
        deltas = [u.payload for u in updates]
        weights = [float(u.num_examples) for u in updates]
        return apply_delta(state, self.rule(state, deltas, weights, self.rule_params))
