"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al. 2020, "SCAFFOLD:
Stochastic Controlled Averaging for Federated Learning", Algorithm 1, option II).

The server holds a control variate ``c`` and client i its own ``c_i`` (zero at first;
kept in the disk-backed client store under key ``scaffold_c``). Client i starts from the
server model ``x``, corrects every minibatch gradient by ``c - c_i`` (``train_loop``'s
``after_backward`` hook, before clipping and the optimizer step) for K steps of lr eta_l,
and then sets

    c_i+ = c_i - c + (x - y_i) / (K * eta_l)          (option II, ``control_update: delta``)

It sends the delta ``y_i - x`` and ``delta_c_i = c_i+ - c_i`` (payload names
``scaffold_c/<param>``). The server applies the aggregated delta (rule + server optimizer,
whose lr is eta_g) and updates ``c <- c + |S|/N mean_S(delta_c) = c + sum_S(delta_c) / N``
with N the total number of clients (the server half: ``aggregators/scaffold.py``).

Option II's formula equals the mean of the K uncorrected minibatch gradients only for
plain SGD; with AdamW (the default local optimizer) ``(x - y)/(K eta)`` is on the scale of
``1`` per coordinate, far larger than the gradients it corrects. ``control_update:
mean_grad`` therefore sets ``c_i+`` to that mean of the K raw gradients directly, which is
the same quantity under plain SGD and stays on the gradient's scale under any optimizer.
``mean_grad`` is the default: ``delta`` with AdamW is refused at config time (it does not
converge, docs/algorithms.md). The server's ``c`` travels in the declared broadcast group
``scaffold_c`` (``Instruction.broadcast``), through the downlink codec chain.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.scaffold import BROADCAST, PREFIX
from fedfm.core.types import Instruction, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.feddyn import require_store
from fedfm.learners.fedprox import anchored, trainable
from fedfm.learners.local import delta_update
from fedfm.learners.loop import train_loop
from fedfm.peft.state import set_state

STORE_KEY = "scaffold_c"


class ScaffoldParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    control_update: Literal["delta", "mean_grad"] = Field(
        "mean_grad", description="delta: option II (x - y)/(K lr); mean_grad: mean of the K raw gradients"
    )


def client_control_update(c_i: State, c: State, delta: State, steps: int, lr: float) -> tuple[State, State]:
    """Option II: c_i+ = c_i - c + (x - y)/(K lr), with delta = y - x. Returns (c_i+, c_i+ - c_i)."""
    new = {k: c_i[k] - c[k] - delta[k] / (steps * lr) for k in c_i}
    return new, {k: new[k] - c_i[k] for k in c_i}


class ScaffoldLearner:
    def __init__(self, params: ScaffoldParams):
        self.control_update = params.control_update

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        store = require_store(ctx, "scaffold")
        if BROADCAST not in instruction.broadcast:
            raise ValueError(f"scaffold: the instruction for client {ctx.cid} carries no server control variate")
        c = instruction.broadcast[BROADCAST]
        stored = store.get(ctx.cid, STORE_KEY)
        c_i = stored if stored is not None else {k: torch.zeros_like(v) for k, v in c.items()}
        set_state(ctx.model, instruction.state)
        params = trainable(ctx.model)
        correction = anchored(params, {k: c[k] - c_i[k] for k in c_i})
        grad_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}  # float32 on a bf16 model too

        def correct() -> None:
            for n, p in params.items():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grad_sum[n].add_(p.grad.to(torch.float32))
                p.grad.add_(correction[n])

        metrics = train_loop(ctx, after_backward=correct)
        update = delta_update(instruction, ctx, metrics)
        steps = int(metrics["steps"])
        if steps == 0:  # c_i+ is a mean over the K local steps; with none it is undefined (0/0)
            raise ValueError(f"scaffold: client {ctx.cid} took no local step (no training examples left), so its "
                             "control variate cannot be updated")
        if self.control_update == "delta":
            c_new, dc = client_control_update(c_i, c, update.payload, steps, ctx.train.lr)
        else:
            c_new = {n: (grad_sum[n] / steps).to("cpu", torch.float32) for n in c_i}
            dc = {k: c_new[k] - c_i[k] for k in c_i}
        store.put(ctx.cid, STORE_KEY, c_new)
        update.payload = {**update.payload, **{PREFIX + k: v for k, v in dc.items()}}
        return update


register_learner("scaffold", ScaffoldLearner, ScaffoldParams)
