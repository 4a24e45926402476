"""Untargeted model poisoning as client middleware (``after_train``): what an attacker
sends instead of its honest delta ``x``.

- ``sign_flip``: ``-scale * x`` (the "reversed gradient" attack; e.g. Li, Ngai and Voigt
  2023, "An Experimental Study of Byzantine-Robust Aggregation Schemes in Federated
  Learning"; scale 1 by default);
- ``gaussian_noise``: ``N(mean, std^2)`` in every coordinate instead of ``x`` (the
  "noise" attack of the same study), seeded by the client's round seed;
- ``scaling``: ``factor * x`` (a boosted update; Bagdasaryan et al. 2020 scale a
  backdoored update this way).

Set by config alone: ``attack: {name: sign_flip, fraction: 0.2}`` or a role's middleware.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.seeding import derive_seed
from fedfm.learners.middleware import PassThrough, register_middleware

NOISE_TAG = 0xA77AC


class SignFlipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(1.0, gt=0, description="the attacker sends -scale times its delta")


class GaussianNoiseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: float = Field(0.0, description="mean of the noise sent")
    std: float = Field(0.1, ge=0, description="standard deviation of the noise sent")


class ScalingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = Field(10.0, description="the attacker sends factor times its delta")


def scaled(payload, factor: float):
    return {k: (t * factor if t.is_floating_point() else t) for k, t in payload.items()}


def noise_like(payload, mean: float, std: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(payload):
        t = payload[k]
        out[k] = (torch.randn(t.shape, generator=g, dtype=torch.float64) * std + mean).to(t.dtype) if t.is_floating_point() else t
    return out


class SignFlip(PassThrough):
    name = "sign_flip"

    def __init__(self, params: SignFlipParams):
        self.scale = params.scale

    def after_train(self, update, ctx):
        return replace(update, payload=scaled(update.payload, -self.scale))


class GaussianNoise(PassThrough):
    name = "gaussian_noise"

    def __init__(self, params: GaussianNoiseParams):
        self.p = params

    def after_train(self, update, ctx):
        return replace(update, payload=noise_like(update.payload, self.p.mean, self.p.std, derive_seed(ctx.seed, NOISE_TAG)))


class Scaling(PassThrough):
    name = "scaling"

    def __init__(self, params: ScalingParams):
        self.factor = params.factor

    def after_train(self, update, ctx):
        return replace(update, payload=scaled(update.payload, self.factor))


register_middleware("sign_flip", SignFlip, SignFlipParams)
register_middleware("gaussian_noise", GaussianNoise, GaussianNoiseParams)
register_middleware("scaling", Scaling, ScalingParams)
