"""FedProx: local training with a proximal term (Li et al. 2020, "Federated Optimization
in Heterogeneous Networks").

Each client minimises ``L_k(w) + mu/2 ||w - w_global||^2`` over the trainable State, which
keeps local models near the global one under heterogeneous data. The term is added to
every step's loss through ``train_loop``'s ``extra_loss`` hook and is always evaluated, so
with ``mu = 0`` its gradient is exactly zero and the delta is bit-identical to FedAvg's.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.types import Instruction, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import train_loop
from fedfm.peft.state import set_state


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(0.01, ge=0, allow_inf_nan=False, description="weight of the proximal term mu/2 ||w - w_global||^2")


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by State name (the names ``get_state`` uses)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def anchored(params: dict[str, torch.nn.Parameter], state: State) -> State:
    """``state`` moved to each parameter's device and dtype (no gradient)."""
    return {n: state[n].detach().to(p.device, p.dtype) for n, p in params.items()}


def squared_distance(params: dict[str, torch.nn.Parameter], anchor: State) -> torch.Tensor:
    """``||w - anchor||^2`` summed over every trainable tensor (a scalar with gradient)."""
    return sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())


class FedProxLearner:
    def __init__(self, params: FedProxParams):
        self.mu = params.mu

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        set_state(ctx.model, instruction.state)
        params = trainable(ctx.model)
        anchor = anchored(params, instruction.state)

        def proximal() -> torch.Tensor:
            return 0.5 * self.mu * squared_distance(params, anchor)

        metrics = train_loop(ctx, extra_loss=proximal)
        return delta_update(instruction, ctx, metrics)


register_learner("fedprox", FedProxLearner, FedProxParams)
