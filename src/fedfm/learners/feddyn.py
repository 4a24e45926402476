"""FedDyn: federated learning with dynamic regularization (Acar et al. 2021, "Federated
Learning Based on Dynamic Regularization", Algorithm 1).

Client k, given the server model ``w`` (theta^{t-1}), minimises

    L_k(v) - <g_k, v> + alpha/2 ||v - w||^2

where ``g_k`` is its previous local gradient (zero at first), then updates
``g_k <- g_k - alpha (v_k - w)`` and sends the delta ``v_k - w``. ``g_k`` lives in the
disk-backed client store (key ``feddyn_grad``), never in RAM across clients.

The server keeps ``h`` (zero at first) and, with ``m`` the total number of clients and P
the clients that returned:

    h <- h - alpha/m * sum_{k in P} (v_k - w)
    w <- mean_{k in P} v_k - h / alpha

Here the mean comes from the aggregation rule (FedAvg weights by examples; the paper's
mean is unweighted, the same when clients hold equal data), so the server's pseudo-gradient
is ``mean(delta) - h/alpha``, which the server optimizer applies (``sgd`` with lr 1.0 gives
Algorithm 1 exactly). ``h`` is checkpointed server state.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.types import Instruction, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.fedprox import anchored, squared_distance, trainable
from fedfm.learners.local import delta_update
from fedfm.learners.loop import train_loop
from fedfm.peft.state import set_state

STORE_KEY = "feddyn_grad"


class FedDynParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.01, gt=0, description="dynamic regularization weight alpha")


def client_gradient_update(grad_prev: State, delta: State, alpha: float) -> State:
    """g_k <- g_k - alpha * (v_k - w)."""
    return {k: grad_prev[k] - alpha * delta[k] for k in grad_prev}


def server_update(h: State, delta_sum: State, mean_delta: State, alpha: float, num_clients: int) -> tuple[State, State]:
    """(h, sum_k delta_k, rule's mean delta) -> (new h, pseudo-gradient mean - h/alpha)."""
    h_new = {k: h[k] - (alpha / num_clients) * delta_sum[k] for k in h}
    return h_new, {k: mean_delta[k] - h_new[k] / alpha for k in h}


def require_store(ctx: LocalContext, name: str):
    if ctx.store is None:
        raise ValueError(f"learner '{name}' keeps per-client state and needs a client store (client {ctx.cid})")
    return ctx.store


class FedDynServer:
    """Server side of FedDyn: the ``h`` State."""

    prefix = "feddyn.h"

    def __init__(self, alpha: float, num_clients: int):
        self.alpha, self.num_clients = alpha, num_clients
        self.h: State = {}

    def broadcast(self, state: State) -> dict:
        return {}

    def payload_reference(self, state: State) -> State:
        return state

    def combine(self, state: State, payloads: Sequence[State], mean_delta: State) -> State:
        h = self.h or {k: torch.zeros_like(v) for k, v in state.items()}
        total = {k: torch.stack([p[k].to(state[k].dtype) for p in payloads]).sum(0) for k in state}
        self.h, pseudo = server_update(h, total, mean_delta, self.alpha, self.num_clients)
        return pseudo

    def state_dict(self) -> dict[str, State]:
        return {self.prefix: self.h} if self.h else {}

    def load_state_dict(self, groups: dict[str, State]) -> None:
        self.h = dict(groups.get(self.prefix, {}))


class FedDynLearner:
    def __init__(self, params: FedDynParams):
        self.alpha = params.alpha

    def server_part(self, num_clients: int) -> FedDynServer:
        return FedDynServer(self.alpha, num_clients)

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        store = require_store(ctx, "feddyn")
        set_state(ctx.model, instruction.state)
        params = trainable(ctx.model)
        anchor = anchored(params, instruction.state)
        stored = store.get(ctx.cid, STORE_KEY)
        grad_prev = stored if stored is not None else {k: torch.zeros_like(v) for k, v in instruction.state.items()}
        linear = anchored(params, grad_prev)

        def dynamic() -> torch.Tensor:
            dot = sum((linear[n] * p).sum() for n, p in params.items())
            return -dot + 0.5 * self.alpha * squared_distance(params, anchor)

        metrics = train_loop(ctx, extra_loss=dynamic)
        update = delta_update(instruction, ctx, metrics)
        store.put(ctx.cid, STORE_KEY, client_gradient_update(grad_prev, update.payload, self.alpha))
        return update


register_learner("feddyn", FedDynLearner, FedDynParams)
