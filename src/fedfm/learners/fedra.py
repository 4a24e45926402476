"""FedRA's client half (Su et al. 2023, "FedRA: A Random Allocation Strategy for Federated
Tuning to Unleash the Power of Heterogeneous Clients"): train the allocated layers only.

The instruction carries the whole shared State and the layers this client trains this
round (``config["layers"]``, drawn by the server, ``aggregators/fedra.py``). Every
trainable tensor of another layer is frozen for the round (``requires_grad`` off, so it
is neither in the optimizer nor given a weight gradient) and stays at the global value;
tensors outside every layer (the task head) are trained by every client.

``forward`` says which model the client runs:

- ``allocated`` (default, the paper's): the client's model is made of its allocated layers
  only, in their order, with the embeddings and the head (the authors' code,
  github.com/leondada/FedRA ``server.py`` ``get_para_range``, copies allocated layer j to
  the sub-model's next block); the other layers are left out of the forward pass, so a
  client with 2 of 6 layers computes and stores activations for 2
  (``peft/layer_stack.kept_layers``).
- ``full`` (FedRA-inspired): every layer stays in the forward pass, the unallocated ones
  frozen: the client's compute and activation memory are the whole model's, and its
  allocated layers are trained in the context of the whole network.

The client is sent the shared State of its layers and of the tensors outside every layer
only under ``allocated`` (the whole State under ``full``). The payload is the delta of the
allocated layers and of the tensors outside every layer, measured from the State as the
model holds it (``learners/local.delta_update``).
Metrics: ``steps``, ``step_s`` (measured), ``bytes_down``, ``layers`` (how many it trained).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.hetrank import state_bytes, timed_train
from fedfm.learners.local import delta_update
from fedfm.peft.hetero import layer_of, layer_subset
from fedfm.peft.layer_stack import kept_layers, layer_stack, trainable_only
from fedfm.peft.state import get_state, set_state


class FedRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    forward: Literal["allocated", "full"] = Field(
        "allocated", description="allocated: the client runs its allocated layers only (the paper's sub-model); "
                                 "full: every layer, the unallocated ones frozen")


WHO = "learner fedra"


def check_stack(model) -> None:
    """The layer stack ``forward: allocated`` cuts each client's sub-model from (``fedfm check``)."""
    layer_stack(model, f"{WHO} (forward: allocated; forward: full runs every layer and needs none)")


class FedRALearner:
    def __init__(self, params: FedRAParams | None = None):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        if "layers" not in instruction.config:
            raise ValueError(f"fedra: the instruction for client {ctx.cid} names no layers to train")
        layers = [int(i) for i in instruction.config["layers"]]
        sub_model = self.params is None or self.params.forward == "allocated"
        # a sub-model's client is sent its layers (and the head) only: the other layers keep
        # what the model holds, outside its forward pass
        set_state(ctx.model, {**get_state(ctx.model), **instruction.state} if sub_model else instruction.state)
        # out of the optimizer and of the weight gradients for this round: the other layers' tensors
        train = [p for n, p in ctx.model.named_parameters() if p.requires_grad and (layer_of(n) is None or layer_of(n) in layers)]
        if sub_model:  # the paper's sub-model
            scope = kept_layers(ctx.model, sorted(layers), map(id, train), WHO)
        else:
            scope = trainable_only(ctx.model, map(id, train))
        with scope:
            metrics = timed_train(ctx)
        metrics.update(layers=float(len(layers)), bytes_down=float(state_bytes(instruction.state)))
        return delta_update(instruction, ctx, metrics, names=layer_subset(instruction.state, layers))


register_learner("fedra", FedRALearner, FedRAParams)
