"""Omniscient model poisoning: ALIE and IPM, simulated as server steps at stage ``updates``.

Threat model: these attackers know the honest updates of the round (as the papers
assume: colluding attackers who can estimate them, e.g. from their own data). A client
cannot see other clients' updates, so the simulation runs on the server, *before* any
defense (steps run before the rule, in config order; ``attack:`` puts it first): the
updates of the clients whose role is ``role`` (``ClientSpec.profile["role"]``, from
``ctx.clients``) are replaced by the crafted one. This is attack code for evaluation; it
lives in attacks/ and no aggregator knows of it.

- ``alie`` (Baruch, Baruch and Goldberg 2019, "A Little Is Enough: Circumventing Defenses
  For Distributed Learning"): with mean ``mu`` and standard deviation ``sigma``
  (coordinate-wise, population, unweighted) of the honest updates, every attacker sends
  ``mu - z * sigma``. By default ``z = Phi^{-1}((n - s) / n)`` with
  ``s = floor(n / 2 + 1) - f``, n the round's updates and f its attackers (the paper's
  z_max; n = 50, f = 12: s = 14, z = Phi^{-1}(36/50) = 0.5828); ``z`` may be given.
  When the attackers are a majority of the round (f >= floor(n / 2 + 1), so s <= 0:
  n = 3, f = 2; n = 5, f = 3; n = 4, f = 3), z_max is undefined: ``(n - s) / n >= 1``
  and ``Phi^{-1}`` of it is infinite. The paper derives z_max for attackers who need s
  honest workers on their side and gives no value for this case; any finite cap would
  be a number of this framework's, not the paper's. So such a round (which client
  sampling or dropouts produce by chance) is left unattacked: the attackers' updates go
  on as they are, and the metric ``skipped`` is 1 (0 otherwise). With ``z`` given, every
  round is attacked.
- ``ipm`` (Xie, Koyejo and Gupta 2020, "Fall of Empires: Breaking Byzantine-tolerant SGD by
  Inner Product Manipulation"): every attacker sends ``-epsilon * mu``.

A round with no attacker or no honest update is left as is. Metrics: ``attackers`` (how
many updates were replaced), ``skipped`` (1 when the round held attackers but was left
unattacked: no honest update to craft from, or ALIE's undefined z_max; 0 otherwise) and,
for ALIE, ``z``.

Both craft every tensor of the payload, so they are refused at config time with learner
``ifca``, whose payload also carries its cluster weight (``personalize/ifca.py``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import NormalDist

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.types import State, Update

OMNISCIENT = ("alie", "ipm")


class AlieParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field("attacker", description="the client role whose updates are replaced")
    z: float | None = Field(None, description="standard deviations from the honest mean; default: the paper's z_max")


class IpmParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field("attacker", description="the client role whose updates are replaced")
    epsilon: float = Field(0.5, gt=0, description="attackers send -epsilon times the honest mean")


def alie_z(n: int, f: int) -> float | None:
    """The paper's z_max for n updates of which f are the attackers', or None where it is
    undefined (attackers a majority: s = floor(n / 2 + 1) - f <= 0)."""
    if not 0 < f < n:
        raise ValueError(f"alie: z_max needs 0 < f < n attackers among n updates, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    if s <= 0:
        return None
    return NormalDist().inv_cdf((n - s) / n)


def split_roles(updates: list[Update], ctx, role: str) -> tuple[list[int], list[int]]:
    roles = {c.cid: c.profile.get("role") for c in ctx.clients}
    bad = [i for i, u in enumerate(updates) if roles.get(u.cid) == role]
    return bad, [i for i in range(len(updates)) if i not in bad]


def honest_stats(updates: list[Update], honest: list[int]) -> tuple[State, State]:
    names = list(updates[honest[0]].payload)
    mu, sd = {}, {}
    for k in names:
        x = torch.stack([updates[i].payload[k].to(torch.float64) for i in honest])  # (h, *shape)
        mu[k], sd[k] = x.mean(0), x.std(0, correction=0)
    return mu, sd


def replace_attackers(updates: list[Update], bad: list[int], payload: State) -> list[Update]:
    out = list(updates)
    for i in bad:
        like = updates[i].payload
        out[i] = replace(updates[i], payload={k: payload[k].to(like[k].dtype) if k in payload else v for k, v in like.items()})
    return out


class Alie:
    name = "alie"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: AlieParams):
        self.p = params

    def __call__(self, updates: list[Update], ctx, state: State):
        bad, honest = split_roles(updates, ctx, self.p.role)
        if not bad or not honest:  # skipped: attackers there, but no honest update to craft from
            return updates, state, {"attackers": 0, "skipped": int(bool(bad))}
        z = self.p.z if self.p.z is not None else alie_z(len(updates), len(bad))
        if z is None:  # attackers a majority of the round: z_max undefined (module docstring)
            return updates, state, {"attackers": 0, "skipped": 1}
        mu, sd = honest_stats(updates, honest)
        crafted = {k: mu[k] - z * sd[k] for k in mu}
        return replace_attackers(updates, bad, crafted), state, {"attackers": len(bad), "z": z, "skipped": 0}


class Ipm:
    name = "ipm"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: IpmParams):
        self.p = params

    def __call__(self, updates: list[Update], ctx, state: State):
        bad, honest = split_roles(updates, ctx, self.p.role)
        if not bad or not honest:  # skipped: attackers there, but no honest update to craft from
            return updates, state, {"attackers": 0, "skipped": int(bool(bad))}
        mu, _ = honest_stats(updates, honest)
        crafted = {k: -self.p.epsilon * mu[k] for k in mu}
        return replace_attackers(updates, bad, crafted), state, {"attackers": len(bad), "skipped": 0}


register_server_step("alie", Alie, AlieParams)
register_server_step("ipm", Ipm, IpmParams)
