"""What simulated dropout does to the rounds, said before training (``fedfm check``, ``fedfm run``).

A round needs ``need`` accepted updates (``federation.min_clients``, or more where the
aggregator's rule or the learner's server part combines more: Krum's ``2f + 3``, FedBPT's
every sampled client; ``runtime/algorithm.fewest_combined``). With ``k`` clients sampled
and each dropping out independently with probability ``p`` (``faults.dropout``,
``runtime/faults.py``), an attempt keeps at least ``need`` with probability

    q = sum_{j = need..k} C(k, j) (1 - p)^j p^(k - j)

and the round is skipped after ``1 + federation.max_retries`` failed attempts with
probability ``(1 - q)^(1 + max_retries)``.

An exchange whose phases drop clients at random (secure aggregation's per-phase
``dropout``) registers its stages with ``register_dropout_stages``: given the ``n``
clients that began the round's phases, the stages in order, each a probability that a
client drops there and the fewest that must be left after it (secure aggregation's
threshold t in every phase). Then ``q`` is the probability that the count, thinned stage
by stage (a binomial draw each), never falls below a stage's floor, with ``need`` the
floor of the train step; it is computed over the counts (a Markov chain on 0..k, binomial
probabilities in log space so that no count overflows), by hand: a few binomial tails,
no library needed. Random dropout alone is
counted: a straggler deadline, an exchange's fixed ``drop`` list, a failed or a rejected
client only make it worse.

Where the counts do not decide (SecAgg+'s neighbourhoods: *which* clients drop matters),
the exchange also registers an ``estimate``: given its parameters, the sampled clients,
``faults.dropout`` and ``need``, an ``Estimate`` of ``q`` (by simulation, with its
standard error) or None where the chain is exact. The outlook then takes the smallest
``q`` (each is the probability of one exchange's conditions, so the joint one is at most
that), and says it was estimated, with the exchange's advice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel

SKIP_WARNING = 0.05  # warn when a round is skipped with at least this probability


@dataclass(frozen=True)
class Stage:
    """One place in a round where a client may drop: with probability ``p``, and the round
    attempt fails if fewer than ``floor`` are left after it."""

    name: str
    p: float
    floor: int
    when: Literal["before_train", "train", "after_train"]


@dataclass(frozen=True)
class Estimate:
    """An exchange's own estimate of the probability ``q`` that an attempt finishes, with
    ``how`` it was had, and ``advise(failure)``: what would keep an attempt's failure at
    most ``failure`` (called only when the outlook warns)."""

    q: float
    se: float
    how: str
    advise: Callable[[float], str] | None = None


StageFn = Callable[[BaseModel, int], list[Stage]]
EstimateFn = Callable[[BaseModel, int, float, int], Estimate | None]
_STAGES: dict[str, StageFn] = {}
_ESTIMATES: dict[str, EstimateFn] = {}


def register_dropout_stages(exchange: str, stages: StageFn, estimate: EstimateFn | None = None) -> StageFn:
    """``stages(params, n)``: the stages of exchange ``exchange`` for a round whose phases
    began with ``n`` clients; ``estimate(params, sampled, faults_dropout, need)``: its own
    estimate of ``q`` where the stages' counts do not decide (None: they do)."""
    _STAGES[exchange] = stages
    if estimate is not None:
        _ESTIMATES[exchange] = estimate
    return stages


def _log_factorials(k: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, k + 1, dtype=np.float64)))])


def survivors(n: int, p: float, lf: np.ndarray | None = None) -> np.ndarray:
    """P[j of n clients stay] for j = 0..n, each dropping with ``p`` (in log space: no
    overflow for any n)."""
    j = np.arange(n + 1)
    if p <= 0 or p >= 1:
        out = np.zeros(n + 1)
        out[n if p <= 0 else 0] = 1.0
        return out
    lf = _log_factorials(n) if lf is None else lf
    return np.exp(lf[n] - lf[j] - lf[n - j] + j * np.log1p(-p) + (n - j) * np.log(p))


def attempt_keeps(k: int, need: int, p: float) -> float:
    """Probability that at least ``need`` of ``k`` clients stay when each drops with ``p``."""
    return min(float(survivors(k, p)[max(need, 0):].sum()), 1.0)


def _thinning(k: int, p: float) -> np.ndarray:
    """(k+1, k+1): row i is the distribution of survivors of i clients dropping with ``p``."""
    lf = _log_factorials(k)
    out = np.zeros((k + 1, k + 1))
    for i in range(k + 1):
        out[i, : i + 1] = survivors(i, p, lf)
    return out


def chain_keeps(k: int, need: int, p: float, stages: Callable[[int], list[Stage]]) -> float:
    """Probability that an attempt of ``k`` sampled clients ends with at least ``need``
    updates and every stage's floor met: dropout ``p`` first, then ``stages(n)`` for the
    ``n`` left (before_train, train, after_train), ``need`` checked after the train stages.
    Starts below 1e-15 of probability are skipped (their sum is negligible)."""
    order = {"before_train": 0, "train": 1, "after_train": 2}
    matrices: dict[float, np.ndarray] = {}
    total = 0.0
    for n, start in enumerate(survivors(k, p)):
        if start < 1e-15:
            continue
        dist = np.zeros(n + 1)
        dist[n] = start
        steps = sorted(stages(n), key=lambda s: order[s.when])
        floors = []
        for s in steps:  # need is the train step's floor, or applied before the first after_train stage
            floors.append(max(s.floor, need) if s.when == "train" else s.floor)
        if not any(s.when == "train" for s in steps):
            at = next((i for i, s in enumerate(steps) if s.when == "after_train"), len(steps))
            steps.insert(at, Stage("need", 0.0, need, "train"))
            floors.insert(at, need)
        for s, floor in zip(steps, floors):
            if s.p > 0:
                if s.p not in matrices:
                    matrices[s.p] = _thinning(k, s.p)
                dist = dist @ matrices[s.p][: n + 1, : n + 1]
            dist[: max(floor, 0)] = 0.0
        total += float(dist.sum())
    return min(total, 1.0)  # float sums may end a hair above 1


def _exchange_stages(exp) -> tuple[Callable[[int], list[Stage]] | None, list[str], list[tuple[BaseModel, EstimateFn]]]:
    """The registered stages of the run's exchanges (None when no exchange registered any),
    the names of those that drop at random, and the (params, estimate) of those with one."""
    from fedfm.core.exchanges import parse_exchange

    found = []
    for i, spec in enumerate(exp.exchanges):
        name, params = parse_exchange(spec, f"exchanges[{i}]")
        if name in _STAGES:
            found.append((f"exchanges[{i}] ({name})", params, _STAGES[name], _ESTIMATES.get(name)))

    def stages(n: int) -> list[Stage]:
        return [s for _, params, fn, _ in found for s in fn(params, n)]

    random = [where for where, params, fn, _ in found if any(s.p > 0 for s in fn(params, exp.federation.clients))]
    estimates = [(params, est) for _, params, _, est in found if est is not None]
    return (stages if found else None), random, estimates


def dropout_outlook(exp) -> list[str]:
    """A warning when random dropout makes a skipped round likely (at least ``SKIP_WARNING``)."""
    p = exp.faults.dropout
    stages, random, estimates = _exchange_stages(exp)
    if p <= 0 and not random:
        return []
    from fedfm.aggregators.server_part import build_server_part
    from fedfm.learners import learners
    from fedfm.runtime.algorithm import fewest_combined
    from fedfm.runtime.sampling import clients_per_round

    fed = exp.federation
    k = clients_per_round(fed, fed.clients)
    params = learners.parse(exp.learner.name, exp.learner.params(), "learner")
    fewest, reason = fewest_combined(exp, build_server_part(exp.learner.name, params, fed.clients))
    need, why = (fed.min_clients, f"min_clients {fed.min_clients}") if fed.min_clients >= fewest else (fewest, reason)
    q = chain_keeps(k, need, p, stages) if stages is not None else attempt_keeps(k, need, p)
    own = [e for e in (est(params, k, p, need) for params, est in estimates) if e is not None]
    best = min(own, key=lambda e: e.q, default=None)
    if best is not None and best.q < q:
        q = best.q
    else:
        best = None
    skip = (1 - q) ** (1 + fed.max_retries)
    if skip < SKIP_WARNING:
        return []
    what = [f"faults.dropout {p:g}"] if p > 0 else []
    what += [f"the per-phase dropout of {where}" for where in random]
    besides = " and every phase's threshold" if stages is not None else ""
    keeps = f"with probability {q:.3f}" if best is None else f"with probability about {q:.3f} (± {best.se:.3f}; {best.how})"
    advice = f"; {best.advise(SKIP_WARNING ** (1 / (1 + fed.max_retries)))}" if best is not None and best.advise is not None else ""
    return [f"{' and '.join(what)}: a round needs {need} of its {k} sampled clients ({why}){besides}; an attempt keeps "
            f"that many {keeps}, so with federation.max_retries {fed.max_retries} a round is skipped "
            f"with probability {skip:.3f} (about {skip * exp.rounds:.1f} of {exp.rounds} rounds), from random dropout alone{advice}"]


__all__ = ["Estimate", "Stage", "attempt_keeps", "chain_keeps", "dropout_outlook", "register_dropout_stages", "survivors"]
