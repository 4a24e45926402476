"""Plain local training (the client side of FedAvg; McMahan et al. 2017,
"Communication-Efficient Learning of Deep Networks from Decentralized Data")."""

from __future__ import annotations

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.loop import train_loop
from fedfm.peft.state import get_state, set_state


def delta_update(instruction: Instruction, ctx: LocalContext, metrics: dict[str, float]) -> Update:
    trained = get_state(ctx.model)
    delta = {k: trained[k] - instruction.state[k].to(trained[k].dtype) for k in trained}
    return Update(cid=ctx.cid, payload=delta, num_examples=len(ctx.examples), metrics=metrics)


class LocalLearner:
    def __init__(self, params=None):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        set_state(ctx.model, instruction.state)
        metrics = train_loop(ctx)
        return delta_update(instruction, ctx, metrics)


register_learner("local", LocalLearner)
