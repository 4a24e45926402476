"""An Algorithm = configure / local_update / aggregate, composed from the config.

Backends call these methods and nothing else, so one config runs unchanged on every
backend. Composition:

- a learner (client side: local, fedprox, feddyn, scaffold), which may bring a server
  part holding its own server state (FedDyn's ``h``, SCAFFOLD's ``c``);
- an aggregation rule (``aggregator.rule``) combining client deltas into one
  pseudo-gradient;
- a server optimizer (``server_optimizer.name``: sgd, fedavgm, fedadam, fedyogi,
  fedadagrad) applying that pseudo-gradient to the State, with explicit moments.

One round on the server: ``rule(model deltas) -> server part's combine -> server
optimizer``. All server-side state is returned by ``state_dict`` as named tensors
(``"<group>/<param name>"``, e.g. ``opt.m/...``, ``scaffold.c/...``) for checkpointing;
per-client state lives only in the client store.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from fedfm.aggregators import aggregators, server_optimizers
from fedfm.core.types import ClientSpec, Instruction, State, Update
from fedfm.learners import build_learner
from fedfm.learners.base import LocalContext

OPT_PREFIX = "opt."


class ServerPart(Protocol):
    """The server side of a client algorithm with server state (FedDyn, SCAFFOLD)."""

    def broadcast(self, state: State) -> dict[str, Any]: ...

    def payload_reference(self, state: State) -> State: ...

    def combine(self, state: State, payloads: Sequence[State], mean_delta: State) -> State: ...

    prefix: str  # the group name of its state in ``Algorithm.state_dict``

    def state_dict(self) -> dict[str, State]: ...

    def load_state_dict(self, groups: dict[str, State]) -> None: ...


def flatten(groups: dict[str, State]) -> dict[str, torch.Tensor]:
    """{"opt.m": {"w": t}} -> {"opt.m/w": t} (cloned, contiguous)."""
    out = {}
    for group, tensors in groups.items():
        for name, t in tensors.items():
            out[f"{group}/{name}"] = t.detach().clone().contiguous()
    return out


def unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, State]:
    groups: dict[str, State] = {}
    for key, t in tensors.items():
        if "/" not in key:
            raise KeyError(f"algorithm state key '{key}' has no '<group>/' prefix")
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = t
    return groups


class Algorithm:
    def __init__(self, exp):
        self.exp = exp
        self.learner = build_learner(exp.learner)
        make_server = getattr(self.learner, "server_part", None)
        self.server: ServerPart | None = make_server(exp.federation.clients) if make_server else None
        spec = exp.aggregator
        self.rule = aggregators.get(spec.rule).obj
        self.rule_params = aggregators.parse(spec.rule, spec.params(), "aggregator")
        so = exp.server_optimizer
        self.optimizer = server_optimizers.get(so.name).obj
        self.optimizer_params = server_optimizers.parse(so.name, so.params(), "server_optimizer")
        self.moments: dict[str, State] = {}

    def configure(self, rnd: int, state: State, clients: Sequence[ClientSpec]) -> list[Instruction]:
        extra = self.server.broadcast(state) if self.server is not None else {}
        return [Instruction(round=rnd, cid=c.cid, state=state, config=dict(extra)) for c in clients]

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        return self.learner.local_update(instruction, ctx)

    def payload_reference(self, state: State) -> State:
        """Names and shapes of what a client sends (decoders check against it).

        Deltas over the State by default; SCAFFOLD adds its control-variate deltas
        (``scaffold_c/<name>``).
        """
        return self.server.payload_reference(state) if self.server is not None else state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The server-side state (optimizer moments, FedDyn h, SCAFFOLD c) as named
        tensors, checkpointed after every round next to the model State."""
        groups = {OPT_PREFIX + slot: m for slot, m in self.moments.items()}
        if self.server is not None:
            groups.update(self.server.state_dict())
        return flatten(groups)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        groups = unflatten(tensors)
        moments = {g[len(OPT_PREFIX):]: s for g, s in groups.items() if g.startswith(OPT_PREFIX)}
        rest = {g: s for g, s in groups.items() if not g.startswith(OPT_PREFIX)}
        known = {self.server.prefix} if self.server is not None else set()
        unexpected = sorted(set(rest) - known)
        if unexpected:
            raise KeyError(f"unexpected algorithm state groups {unexpected} for learner '{self.exp.learner.name}'")
        self.moments = moments
        if self.server is not None:
            self.server.load_state_dict(rest)

    def aggregate(self, state: State, updates: Sequence[Update]) -> State:
        payloads = [u.payload for u in updates]
        model_deltas = [{k: p[k] for k in state} for p in payloads]
        weights = [float(u.num_examples) for u in updates]
        delta = self.rule(state, model_deltas, weights, self.rule_params)
        if self.server is not None:
            delta = self.server.combine(state, payloads, delta)
        new_state, self.moments = self.optimizer(state, delta, self.moments, self.optimizer_params)
        return new_state
