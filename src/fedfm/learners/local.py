"""Plain local training (the client side of FedAvg; McMahan et al. 2017,
"Communication-Efficient Learning of Deep Networks from Decentralized Data")."""

from __future__ import annotations

from typing import Iterable

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.loop import train_loop
from fedfm.peft.state import get_state, set_state


def delta_update(instruction: Instruction, ctx: LocalContext, metrics: dict[str, float],
                 names: Iterable[str] | None = None) -> Update:
    """The delta ``trained - start`` over the trainable State, where ``start`` is the
    instruction's State as the model holds it (cast to each parameter's dtype, as
    ``set_state`` copied it in): on a bfloat16 or float16 model, the rounding of the
    server's float32 State is not a move the client made. Without that, an untrained
    client reported the rounding error as its update, which FedAdam/FedYogi amplify to
    steps of about the server lr per coordinate and FedDyn/SCAFFOLD accumulate in h, g_k and
    c_i; the server keeps the float32 State and adds the clients' real moves to it.
    ``names``: the part of the State the update covers (default: all of it)."""
    trained = get_state(ctx.model)
    if names is not None:
        trained = {k: trained[k] for k in names}
    dtypes = {n: p.dtype for n, p in ctx.model.named_parameters() if p.requires_grad}
    delta = {k: trained[k] - instruction.state[k].to(dtypes[k]).to(trained[k].dtype) for k in trained}
    return Update(cid=ctx.cid, payload=delta, num_examples=len(ctx.examples), metrics=metrics)


class LocalLearner:
    def __init__(self, params=None):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        set_state(ctx.model, instruction.state)
        metrics = train_loop(ctx)
        return delta_update(instruction, ctx, metrics)


register_learner("local", LocalLearner)
