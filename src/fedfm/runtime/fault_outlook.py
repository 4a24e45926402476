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
floor of the train step; it is computed exactly over the counts (a Markov chain on
0..k), by hand: a few binomial tails, no library needed. Random dropout alone is
counted: a straggler deadline, an exchange's fixed ``drop`` list, a failed or a rejected
client only make it worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Callable, Literal

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


StageFn = Callable[[BaseModel, int], list[Stage]]
_STAGES: dict[str, StageFn] = {}


def register_dropout_stages(exchange: str, stages: StageFn) -> StageFn:
    """``stages(params, n)``: the stages of exchange ``exchange`` for a round whose phases
    began with ``n`` clients."""
    _STAGES[exchange] = stages
    return stages


def attempt_keeps(k: int, need: int, p: float) -> float:
    """Probability that at least ``need`` of ``k`` clients stay when each drops with ``p``."""
    return sum(comb(k, j) * (1 - p) ** j * p ** (k - j) for j in range(max(need, 0), k + 1))


def _thin(dist: list[float], p: float, floor: int) -> list[float]:
    """The distribution of the count after each client drops with ``p``, below ``floor`` removed."""
    out = [0.0] * len(dist)
    for i, w in enumerate(dist):
        if w:
            for j in range(max(floor, 0), i + 1):
                out[j] += w * comb(i, j) * (1 - p) ** j * p ** (i - j)
    return out


def chain_keeps(k: int, need: int, p: float, stages: Callable[[int], list[Stage]]) -> float:
    """Probability that an attempt of ``k`` sampled clients ends with at least ``need``
    updates and every stage's floor met: dropout ``p`` first, then ``stages(n)`` for the
    ``n`` left (before_train, train, after_train), ``need`` checked after the train stages."""
    order = {"before_train": 0, "train": 1, "after_train": 2}
    total = 0.0
    for n in range(k + 1):
        start = comb(k, n) * (1 - p) ** n * p ** (k - n)
        if not start:
            continue
        dist = [0.0] * n + [start]
        steps = sorted(stages(n), key=lambda s: order[s.when])
        trained = False
        for s in steps:
            if s.when == "after_train" and not trained:
                dist, trained = _thin(dist, 0.0, need), True
            dist = _thin(dist, s.p, s.floor if s.when != "train" else max(s.floor, need))
            trained = trained or s.when == "train"
        if not trained:
            dist = _thin(dist, 0.0, need)
        total += sum(dist)
    return total


def _exchange_stages(exp) -> tuple[Callable[[int], list[Stage]] | None, list[str]]:
    """The registered stages of the run's exchanges (None when no exchange registered any),
    and the names of those that drop at random."""
    from fedfm.core.exchanges import parse_exchange

    found = []
    for i, spec in enumerate(exp.exchanges):
        name, params = parse_exchange(spec, f"exchanges[{i}]")
        if name in _STAGES:
            found.append((f"exchanges[{i}] ({name})", params, _STAGES[name]))

    def stages(n: int) -> list[Stage]:
        return [s for _, params, fn in found for s in fn(params, n)]

    random = [where for where, params, fn in found if any(s.p > 0 for s in fn(params, exp.federation.clients))]
    return (stages if found else None), random


def dropout_outlook(exp) -> list[str]:
    """A warning when random dropout makes a skipped round likely (at least ``SKIP_WARNING``)."""
    p = exp.faults.dropout
    stages, random = _exchange_stages(exp)
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
    skip = (1 - q) ** (1 + fed.max_retries)
    if skip < SKIP_WARNING:
        return []
    what = [f"faults.dropout {p:g}"] if p > 0 else []
    what += [f"the per-phase dropout of {where}" for where in random]
    besides = " and every phase's threshold" if stages is not None else ""
    return [f"{' and '.join(what)}: a round needs {need} of its {k} sampled clients ({why}){besides}; an attempt keeps "
            f"that many with probability {q:.3f}, so with federation.max_retries {fed.max_retries} a round is skipped "
            f"with probability {skip:.3f} (about {skip * exp.rounds:.1f} of {exp.rounds} rounds), from random dropout alone"]


__all__ = ["Stage", "attempt_keeps", "chain_keeps", "dropout_outlook", "register_dropout_stages"]
