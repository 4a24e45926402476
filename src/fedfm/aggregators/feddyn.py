"""FedDyn's server half (Acar et al. 2021, "Federated Learning Based on Dynamic
Regularization", Algorithm 1): the state ``h`` (server-state group ``feddyn.h``).

With ``m`` the number of clients and P those that returned:

    h <- h - alpha/m * sum_{k in P} (v_k - w)
    w <- mean_{k in P} v_k - h / alpha

The mean comes from the aggregation rule, so the pseudo-gradient handed to the server
optimizer is ``mean(delta) - h/alpha`` (``sgd`` with lr 1.0 gives Algorithm 1 exactly).
The client half is ``learners/feddyn.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import ServerState, State

GROUP = "feddyn.h"


def server_update(h: State, delta_sum: State, mean_delta: State, alpha: float, num_clients: int) -> tuple[State, State]:
    """(h, sum_k delta_k, rule's mean delta) -> (new h, pseudo-gradient mean - h/alpha)."""
    h_new = {k: h[k] - (alpha / num_clients) * delta_sum[k] for k in h}
    return h_new, {k: mean_delta[k] - h_new[k] / alpha for k in h}


class FedDynServer(ServerPartBase):
    def __init__(self, params, num_clients: int):
        self.alpha, self.num_clients = params.alpha, num_clients

    def init(self, model: State) -> ServerState:
        return {GROUP: {k: torch.zeros_like(v) for k, v in model.items()}}

    def combine(self, server_state: ServerState, payloads: Sequence[State], mean_delta: State, ctx: RoundContext):
        h = server_state[GROUP]
        total = {k: torch.stack([p[k].to(h[k].dtype) for p in payloads]).sum(0) for k in h}
        h_new, pseudo = server_update(h, total, mean_delta, self.alpha, self.num_clients)
        return {GROUP: h_new}, pseudo


register_server_part("feddyn", FedDynServer)
