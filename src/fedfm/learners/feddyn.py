"""FedDyn: federated learning with dynamic regularization (Acar et al. 2021, "Federated
Learning Based on Dynamic Regularization", Algorithm 1).

Client k, given the server model ``w`` (theta^{t-1}), minimises

    L_k(v) - <g_k, v> + alpha/2 ||v - w||^2

where ``g_k`` is its previous local gradient (zero at first), then updates
``g_k <- g_k - alpha (v_k - w)`` and sends the delta ``v_k - w``. ``g_k`` lives in the
disk-backed client store (key ``feddyn_grad``), never in RAM across clients.

The server half (``h``) is ``aggregators/feddyn.py``. The rule's mean weights by
examples (the paper's mean is unweighted, the same when clients hold equal data).
"""

from __future__ import annotations

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
    alpha: float = Field(0.01, gt=0, allow_inf_nan=False, description="dynamic regularization weight alpha")


def client_gradient_update(grad_prev: State, delta: State, alpha: float) -> State:
    """g_k <- g_k - alpha * (v_k - w)."""
    return {k: grad_prev[k] - alpha * delta[k] for k in grad_prev}


def require_store(ctx: LocalContext, name: str):
    if ctx.store is None:
        raise ValueError(f"learner '{name}' keeps per-client state and needs a client store (client {ctx.cid})")
    return ctx.store


class FedDynLearner:
    def __init__(self, params: FedDynParams):
        self.alpha = params.alpha

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
