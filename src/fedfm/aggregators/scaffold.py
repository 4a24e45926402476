"""SCAFFOLD's server half (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", Algorithm 1): the server control variate ``c``.

``c`` (server-state group ``scaffold.c``, zero at first) is broadcast beside the State as
the declared group ``scaffold_c``; each client sends its model delta plus its control delta
``delta_c_i`` (payload names ``scaffold_c/<param>``). After the rule combines the model
deltas, ``c <- c + |S|/N mean_S(delta_c) = c + sum_S(delta_c) / N`` with N the number of
clients. The client half is ``learners/scaffold.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import ServerState, State

GROUP = "scaffold.c"
BROADCAST = "scaffold_c"
PREFIX = BROADCAST + "/"


def server_control_update(c: State, delta_cs: Sequence[State], num_clients: int) -> State:
    """c <- c + |S|/N * mean_S(delta_c) = c + sum_S(delta_c) / N."""
    return {k: c[k] + torch.stack([d[k] for d in delta_cs]).sum(0) / num_clients for k in c}


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

    def combine(self, server_state: ServerState, payloads: Sequence[State], mean_delta: State, ctx: RoundContext):
        controls = [split_payload(p)[1] for p in payloads]
        return {GROUP: server_control_update(server_state[GROUP], controls, self.num_clients)}, mean_delta


register_server_part("scaffold", ScaffoldServer)
