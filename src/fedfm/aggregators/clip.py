"""``clip_updates``: scale every client update to an L2 norm of at most ``max_norm``.

The norm is taken over the whole payload (every tensor of one client, flattened together),
as client-level DP clipping does (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models", DP-FedAvg) and as norm bounding against poisoning does (Sun et
al. 2019, "Can You Really Backdoor Federated Learning?"). A server step at stage
``updates``; it reports how many updates it clipped and their mean norm before clipping.

``dp_clip_payload`` is the clipping of the DP steps (``dp_clip``, ``dp_client_noise``): the
sensitivity they account holds only if EVERY tensor is inside the ball, so it refuses a
non-floating tensor (``clip_payload`` leaves integer tensors out of the norm and unscaled),
scales in float64, and checks the norm of the result in its own dtype: rounding a scaled
bf16 update (8 significant bits) can land above C (an update clipped to 1 measured
1.00037), in which case the scale shrinks until the stored update is within C.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.types import State, Update


class ClipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_norm: float = Field(..., gt=0, description="largest L2 norm an update may have")


def l2_norm(payload: State) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in payload.values() if t.is_floating_point()))


def clip_payload(payload: State, max_norm: float) -> tuple[State, float]:
    """(payload scaled to norm <= max_norm, its norm before clipping)."""
    norm = l2_norm(payload)
    if norm <= max_norm:
        return payload, norm
    scale = max_norm / norm
    return {k: (t * scale if t.is_floating_point() else t) for k, t in payload.items()}, norm


SHRINK_TRIES = 40


def dp_clip_payload(payload: State, max_norm: float, who: str) -> tuple[State, float]:
    """(payload scaled so that its norm, in its own dtypes, is <= max_norm; its norm before).
    ``who`` names the step and client in the errors."""
    for name, t in payload.items():
        if not t.is_floating_point():
            raise ValueError(f"{who}: tensor '{name}' has dtype {t.dtype}; DP clipping bounds floating-point tensors "
                             "only (an integer tensor would travel outside the clipped norm and the accounted noise)")
    norm = l2_norm(payload)
    if not math.isfinite(norm):
        raise ValueError(f"{who}: the update's L2 norm is {norm}; it cannot be clipped")
    if norm <= max_norm:
        return payload, norm
    scale = max_norm / norm
    for i in range(SHRINK_TRIES):
        out = {k: (t.double() * scale).to(t.dtype) for k, t in payload.items()}
        got = l2_norm(out)
        if got <= max_norm:
            return out, norm
        eps = max(float(torch.finfo(t.dtype).eps) for t in payload.values())
        scale *= max_norm / got * (1 - eps * 2**i)  # rounding pushed it out: shrink by a growing margin
    raise ValueError(f"{who}: could not scale the update to norm <= {max_norm} in its dtypes")


class ClipUpdates:
    name = "clip_updates"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: ClipParams):
        self.max_norm = params.max_norm

    def __call__(self, updates: list[Update], ctx, state: State):
        out, norms, clipped = [], [], 0
        for u in updates:
            payload, norm = clip_payload(u.payload, self.max_norm)
            clipped += int(norm > self.max_norm)
            norms.append(norm)
            out.append(replace(u, payload=payload))
        mean = sum(norms) / len(norms) if norms else 0.0
        return out, state, {"clipped": clipped, "mean_norm": mean}


register_server_step("clip_updates", ClipUpdates, ClipParams)

__all__ = ["ClipParams", "ClipUpdates", "clip_payload", "dp_clip_payload", "l2_norm"]
