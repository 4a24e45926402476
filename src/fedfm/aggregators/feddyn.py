"""FedDyn's server half (Acar et al. 2021, "Federated Learning Based on Dynamic
Regularization", Algorithm 1): the state ``h`` (server-state group ``feddyn.h``).

With ``m`` the number of clients and P those whose updates were kept:

    h <- h - alpha |P|/m rule_P(v_k - w)      (fedavg: alpha/m sum_{k in P} (v_k - w))
    w <- mean_{k in P} v_k - h / alpha

``rule_P`` is the configured rule over the deltas with equal weights: under fedavg the
paper's plain mean, so the first line is Algorithm 1's sum; under a robust rule (median,
trimmed mean, Krum, ...) the rule's combination, so attackers cannot move ``h`` (which
every later model step subtracts) further than they can move the model. The mean of the
second line is the rule's combination with the usual example weights (the same as the
paper's plain mean when clients hold equally many examples), so the pseudo-gradient handed
to the server optimizer is ``mean(delta) - h/alpha`` (``sgd`` with lr 1.0 gives Algorithm 1
exactly). The client half is ``learners/feddyn.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ServerState, State, Update

GROUP = "feddyn.h"


def server_update(h: State, plain: State, kept: int, mean_delta: State, alpha: float, num_clients: int) -> tuple[State, State]:
    """(h, the rule's equally weighted combination of the ``kept`` deltas, the rule's
    example-weighted one) -> (new h, pseudo-gradient mean - h/alpha)."""
    h_new = {k: h[k] - (alpha * kept / num_clients) * plain[k].to(h[k].dtype) for k in h}
    return h_new, {k: mean_delta[k] - h_new[k] / alpha for k in h}


class FedDynServer(ServerPartBase):
    def __init__(self, params, num_clients: int):
        self.alpha, self.num_clients = params.alpha, num_clients

    def init(self, model: State) -> ServerState:
        return {GROUP: {k: torch.zeros_like(v) for k, v in model.items()}}

    def combine_updates(self, server_state: ServerState, updates: Sequence[Update], rule, rule_params, ctx: RoundContext):
        model = server_state[MODEL]
        deltas = [{k: u.payload[k] for k in model} for u in updates]
        weights = [float(u.num_examples) for u in updates]
        mean = rule(model, deltas, weights, rule_params)
        plain = mean if len(set(weights)) == 1 else rule(model, deltas, [1.0] * len(deltas), rule_params)
        h_new, pseudo = server_update(server_state[GROUP], plain, len(updates), mean, self.alpha, self.num_clients)
        return {GROUP: h_new}, pseudo


register_server_part("feddyn", FedDynServer)
