"""Simulated faults: client dropout and stragglers against a round deadline.

Dropout (Bonawitz et al. 2019, "Towards Federated Learning at Scale: System Design"): each
sampled client independently fails to return with probability ``faults.dropout``.

Stragglers (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", which drops
the slow devices of FedAvg rounds): every client gets a fixed speed factor from a profile;
its simulated round time is ``steps * seconds_per_step / speed``, and a client whose time
exceeds ``faults.stragglers.deadline_s`` is dropped. Simulated time (not wall time) keeps
the outcome deterministic. Profiles:

- ``constant``: every speed is 1.
- ``uniform``: speed ~ U(low, high).
- ``lognormal``: speed = exp(N(0, sigma)) (a few very slow and a few very fast devices).
- ``tiers``: speed drawn from ``speeds`` with probabilities ``weights`` (device classes).

Every draw comes from a generator seeded by (seed, client) for speeds and
(seed, round, attempt, client) for dropout, never from a global stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfm.core.seeding import derive_seed

SPEED_TAG = 0x5BEED
DROPOUT_TAG = 0xD40F


def client_speed(cfg, seed: int, cid: int) -> float:
    """The fixed speed factor of client ``cid`` under the straggler profile ``cfg``."""
    if cfg.profile == "constant":
        return 1.0
    rng = np.random.default_rng(derive_seed(seed, cid, SPEED_TAG))
    if cfg.profile == "uniform":
        return float(rng.uniform(cfg.low, cfg.high))
    if cfg.profile == "lognormal":
        return float(np.exp(rng.normal(0.0, cfg.sigma)))
    weights = np.asarray(cfg.weights if cfg.weights is not None else [1.0] * len(cfg.speeds), dtype=np.float64)
    return float(cfg.speeds[int(rng.choice(len(cfg.speeds), p=weights / weights.sum()))])


def simulated_seconds(steps: int, seconds_per_step: float, speed: float) -> float:
    """Simulated time a client needs for ``steps`` local steps."""
    return steps * seconds_per_step / speed


def drops_out(probability: float, seed: int, rnd: int, attempt: int, cid: int) -> bool:
    """Whether client ``cid`` fails to return in this round attempt."""
    if probability <= 0.0:
        return False
    if probability >= 1.0:
        return True
    rng = np.random.default_rng(derive_seed(seed, rnd, attempt, cid, DROPOUT_TAG))
    return bool(rng.random() < probability)


@dataclass
class Verdict:
    """Why a client will not return in this round (``reason`` None: it trains)."""

    cid: int
    reason: str | None
    sim_seconds: float


def judge_client(faults_cfg, seed: int, rnd: int, attempt: int, cid: int, steps: int) -> Verdict:
    """Decide dropout and deadline for one sampled client, before it trains."""
    st = faults_cfg.stragglers
    sim = simulated_seconds(steps, st.seconds_per_step, client_speed(st, seed, cid))
    if drops_out(faults_cfg.dropout, seed, rnd, attempt, cid):
        return Verdict(cid, "dropout", sim)
    if st.deadline_s is not None and sim > st.deadline_s:
        return Verdict(cid, f"straggler: {sim:.1f}s simulated > deadline {st.deadline_s:g}s", sim)
    return Verdict(cid, None, sim)
