"""``dp_client_noise``: the client's share of the noise for distributed DP.

Each of the m clients of a round clips its update to L2 norm C (``dp_clip_payload`` of
``aggregators/clip.py``: norm checked in the payload's dtype, non-floating tensors
refused) and adds Gaussian noise of standard deviation sigma * C / sqrt(m) to every
coordinate, so the sum of the m updates carries N(0, sigma^2 C^2), the noise of
central DP-FedAvg (McMahan et al. 2018), while no single update is sent un-noised. Under
secure aggregation (Bonawitz et al. 2017) the server then sees only the noised sum; that
is the distributed-DP setting of Kairouz et al. 2021 ("The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation") with continuous Gaussian
noise (this is not their discrete mechanism). The client sets its weight to 1, as the
mean of clipped updates needs. The server side is ``dp_noise`` with ``mode:
distributed``, which accounts the noise that arrived (fewer clients, less noise).

Where the share comes from (``privacy/noise_key.py``): with ``FEDFM_DP_NOISE_KEY`` set in
the client node's environment, from the keystream under HMAC-SHA256(key,
"dp_client_noise", client seed, round, client): reproducible with the key, secret
without it. Without the key, from a torch generator seeded from the client's (seed,
round, client) seed and the tag 0xD9: then anyone with the config, the server included,
can regenerate the share and subtract it from the update (or, under secure aggregation,
every share from the sum): simulation only. The update carries ``dp_client_noise.keyed``
(1.0 or 0.0), which ``dp_noise`` reports as ``dp_noise.noise``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.clip import dp_clip_payload
from fedfm.core.seeding import derive_seed
from fedfm.learners.middleware import PassThrough, register_middleware
from fedfm.privacy import noise_key
from fedfm.privacy.noise import KEYED_METRIC, add_gaussian

NOISE_TAG = 0xD9


class DpClientNoiseParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite sigma or norm is refused by name
    clip_norm: float = Field(..., gt=0, description="C: each client clips its update to this L2 norm")
    noise_multiplier: float = Field(..., gt=0, description="sigma: the noise of the SUM is sigma * C")
    clients_per_round: int = Field(..., ge=1, description="m: the noise is shared among this many clients")


class DpClientNoise(PassThrough):
    name = "dp_client_noise"

    def __init__(self, params: DpClientNoiseParams):
        self.p = params

    @property
    def share_std(self) -> float:
        return self.p.noise_multiplier * self.p.clip_norm / math.sqrt(self.p.clients_per_round)

    def after_train(self, update, ctx):
        payload, _ = dp_clip_payload(update.payload, self.p.clip_norm, f"dp_client_noise: client {ctx.cid}")
        seeded = torch.Generator().manual_seed(derive_seed(ctx.seed, NOISE_TAG))
        src = noise_key.source("dp_client_noise", (ctx.seed, ctx.round, ctx.cid), seeded)
        metrics = {**update.metrics, KEYED_METRIC: float(src.kind == noise_key.KEYED)}
        return replace(update, payload=add_gaussian(payload, self.share_std, src), num_examples=1, metrics=metrics)


register_middleware("dp_client_noise", DpClientNoise, DpClientNoiseParams)

__all__ = ["DpClientNoise", "DpClientNoiseParams"]
