"""FedRA's client half (Su et al. 2023, "FedRA: A Random Allocation Strategy for Federated
Tuning to Unleash the Power of Heterogeneous Clients"): train the allocated layers only.

The instruction carries the whole shared State and the layers this client trains this
round (``config["layers"]``, drawn by the server, ``aggregators/fedra.py``). Every
trainable tensor of another layer is frozen for the round (``requires_grad`` off, so it
is neither in the optimizer nor given a weight gradient) and stays at the global value;
tensors outside every layer (the task head) are trained by every client.
The payload is the delta of the allocated layers and of those tensors. Metrics:
``steps``, ``step_s`` (measured), ``bytes_down``, ``layers`` (how many it trained).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.hetrank import state_bytes, timed_train
from fedfm.peft.hetero import layer_of, layer_subset
from fedfm.peft.state import get_state, set_state


class FedRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FedRALearner:
    def __init__(self, params: FedRAParams | None = None):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        if "layers" not in instruction.config:
            raise ValueError(f"fedra: the instruction for client {ctx.cid} names no layers to train")
        layers = [int(i) for i in instruction.config["layers"]]
        set_state(ctx.model, instruction.state)
        frozen = [p for n, p in ctx.model.named_parameters() if p.requires_grad and layer_of(n) is not None and layer_of(n) not in layers]
        for p in frozen:  # out of the optimizer and of the weight gradients for this round
            p.requires_grad_(False)
        try:
            metrics = timed_train(ctx)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        trained = layer_subset(get_state(ctx.model), layers)
        delta = {k: trained[k] - instruction.state[k].to(trained[k].dtype) for k in trained}
        metrics.update(layers=float(len(layers)), bytes_down=float(state_bytes(instruction.state)))
        return Update(cid=ctx.cid, payload=delta, num_examples=len(ctx.examples), metrics=metrics)


register_learner("fedra", FedRALearner, FedRAParams)
