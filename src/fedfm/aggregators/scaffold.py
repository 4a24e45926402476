"""SCAFFOLD's server half (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", Algorithm 1): the server control variate ``c``.

``c`` (server-state group ``scaffold.c``, zero at first) is broadcast beside the State as
the declared group ``scaffold_c``; each client sends its model delta plus its control delta
``delta_c_i`` (payload names ``scaffold_c/<param>``). The configured rule combines the
model deltas (weighted by examples, as for every learner; the paper's step is the plain
mean, the same when clients hold equally many examples) and, separately, the control
deltas with equal weights:

    c <- c + |S|/N rule_S(delta_c)          (fedavg: c + sum_S(delta_c) / N, the paper's)

with N the number of clients and S those whose updates were kept. So a robust rule
(median, trimmed mean, Krum, ...) bounds what attackers do to ``c`` as it bounds what they
do to the model; with a plain sum one client could move ``c``, which every client adds to
its gradients, by any amount. The rule sees the control deltas as it sees model deltas
(the same parameters; a ``space: lora_product`` rule measures them at the current LoRA
factors). The client half is ``learners/scaffold.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ServerState, State, Update

GROUP = "scaffold.c"
BROADCAST = "scaffold_c"
PREFIX = BROADCAST + "/"


def server_control_update(c: State, combined: State, kept: int, num_clients: int) -> State:
    """c <- c + |S|/N * combined, where ``combined`` is the rule's combination of the |S| =
    ``kept`` control deltas (fedavg: their mean, so c + sum_S(delta_c) / N)."""
    return {k: c[k] + (kept / num_clients) * combined[k].to(c[k].dtype) for k in c}


def split_payload(payload: State) -> tuple[State, State]:
    """(model delta, control delta) from a SCAFFOLD payload."""
    model = {k: v for k, v in payload.items() if not k.startswith(PREFIX)}
    control = {k[len(PREFIX):]: v for k, v in payload.items() if k.startswith(PREFIX)}
    return model, control


class ScaffoldServer(ServerPartBase):
    broadcast_groups = (BROADCAST,)

    def __init__(self, params, num_clients: int):
        self.num_clients = num_clients

    def init(self, model: State) -> ServerState:
        return {GROUP: {k: torch.zeros_like(v) for k, v in model.items()}}

    def broadcast(self, server_state: ServerState) -> dict[str, State]:
        return {BROADCAST: server_state[GROUP]}

    def payload_spec(self, shared: State) -> State:
        return {**shared, **{PREFIX + k: v for k, v in shared.items()}}

    def combine_updates(self, server_state: ServerState, updates: Sequence[Update], rule, rule_params, ctx: RoundContext):
        model = server_state[MODEL]
        halves = [split_payload(u.payload) for u in updates]
        delta = rule(model, [m for m, _ in halves], [float(u.num_examples) for u in updates], rule_params)
        combined = rule(model, [c for _, c in halves], [1.0] * len(updates), rule_params)
        c = server_control_update(server_state[GROUP], combined, len(updates), self.num_clients)
        return {GROUP: c}, delta


register_server_part("scaffold", ScaffoldServer)
