"""Norm bounding and weak DP against backdoors (Sun, Kairouz, Suresh and McMahan 2019,
"Can You Really Backdoor Federated Learning?").

- ``norm_bound`` (stage ``updates``): every client update is scaled to an L2 norm of at
  most ``max_norm`` (over the whole payload; ``aggregators/clip.py``'s ``clip_payload``).
- ``weak_dp`` (stage ``delta``): Gaussian noise of standard deviation ``std`` is added to
  every coordinate of the aggregated delta, drawn from the round's seeded generator. The
  paper adds it to the new global model, which with the default server optimizer (``sgd``,
  lr 1) is the same thing. "Weak": the std is far below what a privacy guarantee needs;
  it is a defense, not an accountant's DP (see privacy/ for that).

Used together, in this order:

    server_steps: [{name: norm_bound, max_norm: 0.5}, {name: weak_dp, std: 0.001}]
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.clip import clip_payload
from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.types import State, Update


class NormBoundParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_norm: float = Field(..., gt=0, description="largest L2 norm a client update may have")


class WeakDPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    std: float = Field(..., ge=0, description="standard deviation of the Gaussian noise added to every coordinate")


class NormBound:
    name = "norm_bound"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: NormBoundParams):
        self.max_norm = params.max_norm

    def __call__(self, updates: list[Update], ctx, state: State):
        out, bounded = [], 0
        for u in updates:
            payload, norm = clip_payload(u.payload, self.max_norm)
            bounded += int(norm > self.max_norm)
            out.append(replace(u, payload=payload))
        return out, state, {"bounded": bounded}


class WeakDP:
    name = "weak_dp"
    stage = "delta"
    client_state = None  # every client gets the global State

    def __init__(self, params: WeakDPParams):
        self.std = params.std

    def __call__(self, delta: State, ctx, state: State):
        out = {}
        for k, t in delta.items():
            if not t.is_floating_point() or self.std == 0:
                out[k] = t
                continue
            noise = torch.randn(t.shape, generator=ctx.generator, dtype=torch.float64) * self.std
            out[k] = (t.to(torch.float64) + noise).to(t.dtype)
        return out, state, {}


register_server_step("norm_bound", NormBound, NormBoundParams)
register_server_step("weak_dp", WeakDP, WeakDPParams)
