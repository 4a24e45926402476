"""``centered_clip``: centered clipping (Karimireddy, He and Jaggi 2021, "Learning from
History for Byzantine Robust Optimization"), a server step with memory.

The server keeps ``v``, the previous round's aggregate (zero before the first round), and
iterates ``L`` times

    v <- v + sum_i w_i * clip_tau(x_i - v),      clip_tau(z) = z * min(1, tau / ||z||)

with ``w_i = 1/n`` (the paper's unweighted form; ``weighted: true`` uses the clients'
example shares). The paper applies it to the workers' momenta; here the clients' deltas
(already a multi-step local average) take that place.

As a step at stage ``updates`` it hands the rule updates whose mean *is* the result: the
last iteration's ``v + clip_tau(x_i - v)`` for every client, with every weight set to 1
(or kept, when weighted), so ``aggregator.rule`` must be ``fedavg`` (refused otherwise at
config time, ``aggregators/robust_checks.py``). ``v`` is kept in the step's server-state
group (checkpointed) and becomes the next round's centre. Metrics: ``clipped`` (updates
farther than tau from the last centre) and ``mean_distance``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.flat import names_of
from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.types import State, Update


class CenteredClipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tau: float = Field(..., gt=0, description="clipping radius around the centre")
    iters: int = Field(1, ge=1, description="centred-clipping iterations per round (L)")
    weighted: bool = Field(False, description="weight clients by example counts instead of equally")


def flat(payload: State, names: list[str]) -> torch.Tensor:
    return torch.cat([payload[k].to(torch.float64).reshape(-1) for k in names])


def unflat(row: torch.Tensor, like: State, names: list[str]) -> State:
    out, off = {}, 0
    for k in names:
        n = like[k].numel()
        out[k] = row[off : off + n].reshape(like[k].shape).to(like[k].dtype)
        off += n
    return out


def clip_around(x: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """x (n, d), v (d,) -> (n, d): v + clip_tau(x_i - v)."""
    z = x - v
    norms = z.norm(dim=1, keepdim=True)
    return v + z * (tau / norms.clamp_min(1e-30)).clamp(max=1.0)


class CenteredClip:
    name = "centered_clip"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: CenteredClipParams):
        self.p = params

    def __call__(self, updates: list[Update], ctx, state: State):
        if not updates:
            return updates, state, {}
        like = updates[0].payload
        names = names_of(like)
        x = torch.stack([flat(u.payload, names) for u in updates])  # (n, d)
        v = flat(state, names) if state else torch.zeros(x.shape[1], dtype=torch.float64)
        if self.p.weighted:
            w = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
            w = w / w.sum()
        else:
            w = torch.full((len(updates),), 1.0 / len(updates), dtype=torch.float64)
        last_centre = v
        for _ in range(self.p.iters - 1):
            last_centre = (w[:, None] * clip_around(x, last_centre, self.p.tau)).sum(0)
        pts = clip_around(x, last_centre, self.p.tau)
        v_new = (w[:, None] * pts).sum(0)
        dist = (x - last_centre).norm(dim=1)
        out = [
            replace(u, payload={**u.payload, **unflat(p, like, names)}, num_examples=u.num_examples if self.p.weighted else 1)
            for u, p in zip(updates, pts)
        ]
        metrics = {"clipped": int((dist > self.p.tau).sum()), "mean_distance": float(dist.mean())}
        return out, unflat(v_new, {k: like[k].to(torch.float64) for k in names}, names), metrics


register_server_step("centered_clip", CenteredClip, CenteredClipParams)
