"""``dp_clip``: per-client L2 clipping for client-level DP, with a fixed or an adaptive norm.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): every client update is scaled to L2 norm at most C (``dp_clip_payload`` of
``aggregators/clip.py``, the whole payload as one vector, the norm checked in the
payload's own dtype; a non-floating tensor is refused) and every kept update gets the
same weight (``num_examples`` set to 1), so the rule's mean has sensitivity C / n.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"), when ``target_quantile`` is given: with b_i = 1[||Delta_i|| <= C] and
count noise sigma_b,

    b~ = (sum_i b_i + N(0, sigma_b^2)) / n,      C <- C * exp(-clip_lr * (b~ - target_quantile))

(the geometric update of the paper). C is step state (checkpointed), the count noise is
drawn from ``RoundContext.generator`` (seeded from (seed, round)) or, with
``FEDFM_DP_NOISE_KEY`` set in the server's environment, from the keystream under
HMAC-SHA256(key, "dp_clip.count", seed, round) (``privacy/noise_key.py``); either way a
resumed run draws the same numbers, but only the keyed draw is secret from whoever has
the config. ``dp_noise`` then uses the update noise multiplier
sigma_Delta = (sigma^-2 - (2 sigma_b)^-2)^-1/2, so that the pair (noised sum, noised count)
is as private as one Gaussian mechanism with sigma (Andrew et al., Theorem 1); that needs
2 sigma_b > sigma, checked at config time.

The clip norm used this round and the number of updates are noted for ``dp_noise``
(``privacy/notes.py``).

Metrics: ``clip_norm`` (C of the round) and, when adaptive, ``next_clip_norm`` and
``noised_unclipped_fraction`` are outputs of the accounted mechanism. ``clipped`` (the
exact number of clipped updates) and ``mean_norm`` (the mean update norm before clipping)
are NOT: they are exact statistics of the clients' updates, outside the epsilon reported,
and with adaptive clipping the exact count undoes the count noise for whoever reads
metrics.jsonl. ``report_exact: false`` leaves both out. The default (true) keeps them,
because fedfm's default noise is seeded from the config and protects nothing against a
reader of the run anyway (simulation; ``privacy/noise_key.py``), where they are useful to
study clipping; a run that sets ``FEDFM_DP_NOISE_KEY`` to protect its output should also
set ``report_exact: false``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.clip import dp_clip_payload
from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.types import State, Update
from fedfm.privacy import noise_key, notes


class DpClipParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite sigma or norm is refused by name
    clip_norm: float = Field(..., gt=0, description="C: the fixed clip norm, or the initial one when adaptive")
    target_quantile: float | None = Field(
        None, gt=0, lt=1, description="adaptive clipping (Andrew et al. 2021): the fraction of updates to leave unclipped")
    clip_lr: float = Field(0.2, gt=0, description="eta_C of the geometric clip-norm update")
    count_noise: float | None = Field(
        None, gt=0, description="sigma_b: std of the noise on the unclipped count (default: clients per round / 20)")
    report_exact: bool = Field(
        True, description="write the exact clipped count and mean update norm (not covered by epsilon) to metrics.jsonl")


def adapted_norm(clip_norm: float, unclipped: int, n: int, count_noise_draw: float, target: float, lr: float) -> tuple[float, float]:
    """(next clip norm, noised unclipped fraction) of Andrew et al.'s geometric update."""
    frac = (unclipped + count_noise_draw) / n
    return clip_norm * math.exp(-lr * (frac - target)), frac


def update_noise_multiplier(sigma: float, count_noise: float | None) -> float:
    """sigma_Delta for the sum when the count is also released (Andrew et al. 2021, Thm 1)."""
    if count_noise is None:
        return sigma
    rest = sigma ** -2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(f"adaptive clipping: count_noise {count_noise} must exceed noise_multiplier/2 = {sigma / 2}")
    return rest ** -0.5


class DpClip:
    name = "dp_clip"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: DpClipParams):
        self.p = params

    def count_noise(self, ctx) -> float:
        if self.p.count_noise is not None:
            return self.p.count_noise
        from fedfm.privacy.plan import round_plan

        return round_plan(ctx, "dp_clip").sample_size / 20.0

    def __call__(self, updates: list[Update], ctx, state: State):
        c = float(state["clip_norm"]) if "clip_norm" in state else self.p.clip_norm
        out, unclipped, norms = [], 0, []
        for u in updates:
            payload, norm = dp_clip_payload(u.payload, c, f"dp_clip: client {u.cid}")
            norms.append(norm)
            unclipped += int(norm <= c)
            out.append(replace(u, payload=payload, num_examples=1))
        metrics = {"clip_norm": c}
        if self.p.report_exact:  # exact statistics of the updates, outside the accounting (module docstring)
            metrics.update(clipped=len(out) - unclipped, mean_norm=sum(norms) / max(len(norms), 1))
        new_state: State = {}
        sigma_b = None
        if self.p.target_quantile is not None and out:
            sigma_b = self.count_noise(ctx)
            src = noise_key.source("dp_clip.count", (ctx.seed, ctx.round), ctx.generator)
            draw = float(src.normal(())) * sigma_b
            nxt, frac = adapted_norm(c, unclipped, len(out), draw, self.p.target_quantile, self.p.clip_lr)
            new_state = {"clip_norm": torch.tensor(nxt, dtype=torch.float64)}
            metrics.update(next_clip_norm=nxt, noised_unclipped_fraction=frac)
        elif "clip_norm" in state:
            new_state = dict(state)
        notes.put(ctx, clip_norm=c, n=len(out), count_noise=sigma_b)
        return out, new_state, metrics


register_server_step("dp_clip", DpClip, DpClipParams)

__all__ = ["DpClip", "DpClipParams", "adapted_norm", "update_noise_multiplier"]
