"""``dp_noise``: the Gaussian mechanism of client-level DP, and its accountant.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models") with fixed-size client sampling, accounted with dp-accounting
(``privacy/accounting.py``).

``mode: central`` (stage ``delta``, after a ``dp_clip`` step and the ``fedavg`` rule):
the rule returns the MEAN of the n clipped, equally weighted updates, so this step adds
to every coordinate of that mean Gaussian noise of standard deviation

    sigma_Delta * C / n          (= noise of std sigma_Delta * C on the SUM, divided by n)

where C is the clip norm ``dp_clip`` used this round and sigma_Delta the noise
multiplier (``noise_multiplier``, or solved from ``target_epsilon``; raised above sigma
when clipping is adaptive, to pay for the released noised count: sigma 1.5 and count
noise sigma_b 1 give sigma_Delta 2.27, see ``privacy/clipping.py``). The noise is drawn
in float64, tensor by tensor in sorted name order, so a resumed run adds the same noise:
from ``RoundContext.generator`` (seeded from (seed, round)) when ``FEDFM_DP_NOISE_KEY``
is not set in the server's environment, and then anyone with the config can regenerate
it and subtract it from the released model (simulation only); from the keystream under
HMAC-SHA256(key, "dp_noise", seed, round) when it is set (``privacy/noise_key.py``).

``mode: distributed`` (stage ``updates``): the clients clip and add their share
sigma * C / sqrt(m) themselves (middleware ``dp_client_noise``, m = clients per round),
so the sum of the m updates carries sigma * C and, under secure aggregation, no party
sees an un-noised update. This step adds nothing: it gives every update the same weight,
and accounts the noise that actually arrived: with n of m updates the sum carries
sigma * sqrt(n / m) * C, and that smaller multiplier is what the round is charged.

Either way the step keeps one accounted multiplier per round in its state
(``sigmas``, checkpointed) and writes ``epsilon`` and ``delta`` (spent so far) into each
round's metrics as ``dp_noise.epsilon`` and ``dp_noise.delta``, and ``dp_noise.noise``:
"keyed" or "seeded", the source of the central noise, or in distributed mode of the
clients' shares ("mixed" when some were keyed and some not, with ``keyed_clients``).
With ``max_epsilon`` set, a round that would spend more stops the run with
``PrivacyBudgetSpent`` (before the round's model is applied); a config whose planned
rounds would spend more is refused before it starts (``privacy/checks.py``).

``target_epsilon``: sigma is solved once, for the run's plan (``rounds``, clients, clients
per round), the first time the step runs, and kept in its state (``planned_sigma``, and
``plan``: those three numbers); every later round, a resumed run's included, uses the
recorded sigma. A run resumed with another ``rounds`` (the one key of the plan a resume
may change, ``runtime/checkpoint.py``) is refused with ``PlanChanged``, naming rounds,
the recorded plan, sigma and target_epsilon, at the aggregation of its first round (its
clients have trained; nothing of that round is applied or written, the last checkpoint
stays). Refused rather than re-planned: solving the remaining rounds' sigma from the
epsilon already spent would make the noise, and so the model, depend on when the run was
interrupted (no uninterrupted run of that config gives it), and the budget left may be
too small for any useful sigma. A run meant to be extended gives ``noise_multiplier``:
its rounds may change on resume, epsilon grows with them, ``max_epsilon`` bounds it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.types import State
from fedfm.privacy import noise_key, notes
from fedfm.privacy.accounting import epsilon, solve_noise_multiplier
from fedfm.privacy.clipping import update_noise_multiplier
from fedfm.privacy.accounting import Plan
from fedfm.privacy.plan import round_plan


KEYED_METRIC = "dp_client_noise.keyed"  # 1.0 when a client's share came from its noise key
PLAN = "plan"  # int64 (3,): rounds, clients, clients per round that target_epsilon was solved for
PLANNED_SIGMA = "planned_sigma"  # float64 (1,): the sigma it resolved to


class PrivacyBudgetSpent(RuntimeError):
    """A round would spend more than ``max_epsilon``."""


class PlanChanged(ValueError):
    """A resumed run's plan differs from the one its ``target_epsilon`` was solved for."""


class DpNoiseParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite sigma or norm is refused by name
    mode: Literal["central", "distributed"] = Field("central", description="server adds the noise, or the clients do")
    noise_multiplier: float | None = Field(None, gt=0, description="sigma: noise std on the sum over the clip norm")
    target_epsilon: float | None = Field(None, gt=0, description="solve sigma so that the configured rounds spend this epsilon")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of (epsilon, delta)-DP")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's Renyi DP or privacy-loss-distribution accountant")
    max_epsilon: float | None = Field(None, gt=0, description="budget: refuse to run a round that would spend more")

    @model_validator(mode="after")
    def _one_sigma(self):
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        return self


def resolved_sigma(p: DpNoiseParams, plan: Plan, rounds: int) -> float:
    """The noise multiplier: given, or solved for ``target_epsilon`` over ``rounds`` rounds of ``plan``."""
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    return solve_noise_multiplier(plan, rounds, p.target_epsilon, p.delta)


def add_gaussian(value: State, std: float, source: noise_key.NoiseSource) -> State:
    """``value`` plus N(0, std^2) on every coordinate (float64 draws, sorted names)."""
    out: State = {}
    for name in sorted(value):
        t = value[name]
        noise = source.normal(t.shape) * std
        out[name] = (t.to(torch.float64) + noise).to(t.dtype)
    return {k: out[k] for k in value}


class DpNoise:
    name = "dp_noise"
    client_state = None  # every client gets the global State

    def __init__(self, params: DpNoiseParams):
        self.p = params
        self.stage = "delta" if params.mode == "central" else "updates"

    def _sigma(self, plan: Plan, rounds: int, state: State) -> tuple[float, State]:
        """The run's sigma, and the state entries that fix it (module docstring)."""
        if self.p.noise_multiplier is not None:
            return self.p.noise_multiplier, {}
        now = (rounds, plan.population, plan.sample_size)
        if PLANNED_SIGMA not in state:
            sigma = solve_noise_multiplier(plan, rounds, self.p.target_epsilon, self.p.delta)
            return sigma, {PLAN: torch.tensor(now, dtype=torch.int64), PLANNED_SIGMA: torch.tensor([sigma], dtype=torch.float64)}
        recorded = tuple(int(v) for v in state[PLAN].tolist())
        sigma = float(state[PLANNED_SIGMA][0])
        if recorded != now:
            r, n, k = recorded
            eps = epsilon(plan, [sigma] * rounds, self.p.delta)
            raise PlanChanged(
                f"dp_noise: target_epsilon {self.p.target_epsilon} was solved for the recorded plan of rounds {r} "
                f"({k} of {n} clients per round): noise_multiplier {sigma:.4f}, used since the run's first round; "
                f"this run asks for rounds {rounds} ({plan.sample_size} of {plan.population} clients per round), "
                f"which with that noise would end at epsilon {eps:.3f}, not {self.p.target_epsilon} (delta "
                f"{self.p.delta}). The noise of a target_epsilon is fixed for the whole run: resume with rounds: {r}, "
                f"or start a new run (--overwrite) for rounds {rounds}")
        return sigma, {PLAN: state[PLAN], PLANNED_SIGMA: state[PLANNED_SIGMA]}

    def _charge(self, ctx, state: State, accounted: float) -> tuple[State, dict]:
        history = state.get("sigmas", torch.zeros(0, dtype=torch.float64))
        sigmas = torch.cat([history, torch.tensor([accounted], dtype=torch.float64)])
        eps = epsilon(round_plan(ctx, "dp_noise", self.p.accountant), sigmas.tolist(), self.p.delta)
        if self.p.max_epsilon is not None and eps > self.p.max_epsilon + 1e-9:
            raise PrivacyBudgetSpent(
                f"dp_noise: round {ctx.round} would bring epsilon to {eps:.4f} > max_epsilon {self.p.max_epsilon} "
                f"(delta {self.p.delta}); the privacy budget is spent, the run stops before this round's update")
        return {"sigmas": sigmas}, {"epsilon": eps, "delta": self.p.delta, "accounted_noise_multiplier": accounted}

    def __call__(self, value, ctx, state: State):
        plan = round_plan(ctx, "dp_noise", self.p.accountant)
        sigma, fixed = self._sigma(plan, ctx.rounds, state)
        if self.p.mode == "distributed":
            m = plan.sample_size
            n = len(value)
            accounted = sigma * math.sqrt(n / m)
            new_state, metrics = self._charge(ctx, state, accounted)
            new_state.update(fixed)
            flags = [u.metrics.get(KEYED_METRIC) for u in value]
            metrics.update(clients=n, noise=noise_key.summarize(flags), keyed_clients=sum(f == 1.0 for f in flags))
            return [replace(u, num_examples=1) for u in value], new_state, metrics
        c = float(notes.get(ctx, "clip_norm", "dp_noise"))
        n = int(notes.get(ctx, "n", "dp_noise"))
        sigma_delta = update_noise_multiplier(sigma, notes.get(ctx, "count_noise", "dp_noise"))
        new_state, metrics = self._charge(ctx, state, sigma)
        new_state.update(fixed)
        std = sigma_delta * c / n
        src = noise_key.source("dp_noise", (ctx.seed, ctx.round), ctx.generator)
        metrics.update(noise_multiplier=sigma, update_noise_multiplier=sigma_delta, noise_std=std, clip_norm=c, noise=src.kind)
        return add_gaussian(value, std, src), new_state, metrics


register_server_step("dp_noise", DpNoise, DpNoiseParams)

__all__ = ["DpNoise", "DpNoiseParams", "PlanChanged", "PrivacyBudgetSpent", "add_gaussian", "resolved_sigma"]
