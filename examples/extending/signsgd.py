"""signSGD with majority vote (Bernstein, Zhao, Azizzadenesheli and Anandkumar 2019,
"signSGD with Majority Vote is Communication Efficient and Fault Tolerant"), as a fedfm
plugin: a learner whose payload is not the State's float32 delta but its sign, one int8
per parameter (a quarter of the bytes), and the server half that declares that payload
and turns the clients' vote into a step.

    plugins: [signsgd.py]          # this file, next to the config
    learner: {name: signsgd, step: 1.0e-3}

Client: train locally as FedAvg does, send sign(w_local - w) as int8.
Server: the aggregation rule (FedAvg: the example-weighted mean of the signs) gives each
coordinate's vote in [-1, 1]; the server half turns it into ``step * sign(vote)``, the
majority vote, which the server optimizer applies (``sgd`` with lr 1: w <- w + step * sign).

One file, two register calls (the learner and its server half); docs/extending.md walks
through it.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators import ServerPartBase, register_server_part
from fedfm.learners import register_learner
from fedfm.learners.local import LocalLearner


class SignParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: float = Field(1e-3, gt=0, description="server step per coordinate: w <- w + step * sign(vote)")


class SignLearner(LocalLearner):
    """Local training as FedAvg; the payload is the sign of the delta, as int8."""

    def local_update(self, instruction, ctx):
        update = super().local_update(instruction, ctx)
        update.payload = {k: torch.sign(v).to(torch.int8) for k, v in update.payload.items()}
        return update


class SignServer(ServerPartBase):
    """Declares the int8 payload and takes the majority vote of the rule's mean sign (every
    other member keeps ``ServerPartBase``'s value: no server state, nothing broadcast)."""

    def __init__(self, params: SignParams, num_clients: int):
        self.step = params.step

    def payload_spec(self, shared):
        return {k: torch.zeros(v.shape, dtype=torch.int8) for k, v in shared.items()}

    def combine(self, server_state, payloads, mean_delta, ctx):
        return {}, {k: self.step * torch.sign(v) for k, v in mean_delta.items()}


register_learner("signsgd", SignLearner, SignParams)
register_server_part("signsgd", SignServer)
