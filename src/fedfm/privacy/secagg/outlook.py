"""How often a SecAgg+ round attempt fails under random per-phase dropout, neighbourhoods
and the graph included; and the smallest number of neighbours that keeps it rare.

With every client every other's neighbour (SecAgg) an attempt fails only when a phase
leaves fewer than t clients: ``runtime/fault_outlook.py`` computes that exactly over the
counts. With ``neighbours: k`` (SecAgg+, ``graph.py``) two more things fail it, and both
depend on *where* on the ring the dropped clients sit, not only on how many there are:

- a secret left with fewer than t holders that answer the unmasking: a surviving client's
  self-mask seed is held by itself and its k neighbours, a dropped client's mask key by its
  k neighbours (``unmask.py``);
- the masked inputs U3 cut apart in the graph: on the ring (links up to k/2 places either
  way) the survivors fall apart exactly when two or more runs of more than k/2 consecutive
  non-survivors separate them (a path around a link-free gap must jump it in one step).

``attempt_fails`` says which of these ends one attempt, given the phase in which each
client drops, in ring order, checked in the order the phases check them (``exchange.py``):
a phase left below t; U3 below t or below the round's ``need``; U3 cut apart; fewer than t
unmasking answers; a secret below t holders. ``keeps`` estimates the probability that an
attempt finishes by simulating attempts (seeded, so ``fedfm check`` says the same every
time): each sampled client drops before the round with ``faults.dropout``, then in each
phase with that phase's ``dropout``, as ``params.simulated_drop`` draws them. The dropouts
are independent and the ring's order is a uniformly random permutation of the clients
(``graph.ring_order``), so the clients' places on the ring can be taken in index order.
``exact_keeps`` enumerates every outcome for a few clients (tests check ``keeps`` and the
hand-computed cases against it).

``smallest_neighbours`` is fedfm's own way to choose k: the smallest even k whose
estimated per-attempt failure stays below a target. Bell et al. 2020 (CCS) choose k and t
analytically, from n, the dropout rate and the fraction of corrupt clients they defend
against; this search covers dropout only (no corrupt clients) and says nothing about
security, which needs t above the corrupt clients of any neighbourhood.

Written by hand: the rules are the protocol's own, no library models them.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from fedfm.privacy.secagg.common import default_threshold
from fedfm.privacy.secagg.graph import holders
from fedfm.privacy.secagg.params import PHASES, SecAggParams
from fedfm.runtime.fault_outlook import Estimate

NONE = len(PHASES)  # a client that drops in no phase
_U1, _U2, _ROUTED, _U3, _ANSWERED = 1, 2, 3, 4, NONE  # the least drop index of each set's members
DRAWS = 4000  # simulated attempts per estimate: a standard error of at most 0.008


def attempt_fails(drops: np.ndarray, k: int | None, t: int, need: int = 1) -> str | None:
    """Why an attempt fails (None: it finishes). ``drops[i]`` is the index in ``PHASES`` of
    the phase in which the i-th client on the ring drops (``NONE``: it stays); every client
    began the round's phases."""
    drops = np.asarray(drops)
    for floor, what in ((_U1, "advertised keys"), (_U2, "shared"), (_ROUTED, "took their shares")):
        if int((drops >= floor).sum()) < t:
            return f"fewer than t = {t} {what}"
    ring = drops[drops >= _U1]  # the graph is drawn over the clients that advertised keys
    m, u3 = len(ring), ring >= _U3
    if int(u3.sum()) < max(t, need):
        return f"fewer than {max(t, need)} masked inputs"
    complete = k is None or k >= m - 1  # every client is every other's neighbour: the counts decide
    half = 0 if complete else k // 2
    at = np.flatnonzero(u3)
    gaps = np.diff(np.append(at, at[0] + m))  # places from each survivor to the next, around the ring
    if not complete and int((gaps > half).sum()) >= 2:
        return "masked inputs cut apart in the graph"
    answered = (ring == _ANSWERED).astype(np.int64)
    if int(answered.sum()) < t:
        return f"fewer than t = {t} unmasking answers"
    if complete:
        return None
    near = sum(np.roll(answered, o) for o in range(-half, half + 1))  # answering holders: itself and k neighbours
    if bool((near[u3] < t).any()):
        return "a survivor's self-mask seed below t holders"
    if bool((near[(ring >= _U2) & ~u3] < t).any()):
        return "a dropped client's mask key below t holders"
    return None


def _phase_probabilities(p: SecAggParams) -> np.ndarray:
    return np.array([float(p.dropout.get(ph, 0.0)) for ph in PHASES])


def _threshold(p: SecAggParams, n: int, k: int | None) -> int:
    return p.threshold or default_threshold(holders(n, k))


def keeps(p: SecAggParams, sampled: int, fault: float = 0.0, need: int = 1, k: int | None = ...,
          draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """(the estimated probability that an attempt of ``sampled`` clients finishes, its
    standard error), from ``draws`` simulated attempts; ``k`` defaults to ``p.neighbours``."""
    k = p.neighbours if k is ... else k
    rng = np.random.default_rng(seed)
    probs = _phase_probabilities(p)
    ok = 0
    for _ in range(draws):  # one attempt at a time: memory O(sampled), whatever the draws
        alive = rng.random(sampled) >= fault
        dropped = rng.random((int(alive.sum()), len(PHASES))) < probs
        drops = np.where(dropped.any(axis=1), dropped.argmax(axis=1), NONE)
        ok += attempt_fails(drops, k, _threshold(p, len(drops), k), need) is None
    q = ok / draws
    return q, math.sqrt(max(q * (1 - q), 1.0 / draws) / draws)


def exact_keeps(p: SecAggParams, n: int, need: int = 1, k: int | None = ...) -> float:
    """The probability that an attempt of ``n`` clients (all begun) finishes, by
    enumerating the outcomes (each client: the phases it may drop in, or none): for a few
    clients only."""
    if n > 10:
        raise ValueError(f"exact_keeps enumerates up to {NONE + 1}^n outcomes: n = {n} is too many (at most 10)")
    k = p.neighbours if k is ... else k
    probs = _phase_probabilities(p)
    at = [math.prod(1 - probs[:i]) * (probs[i] if i < NONE else 1.0) for i in range(NONE + 1)]  # P[drop index i]
    t, possible = _threshold(p, n, k), [i for i in range(NONE + 1) if at[i] > 0]
    return sum(math.prod(at[i] for i in drops) for drops in itertools.product(possible, repeat=n)
               if attempt_fails(np.array(drops), k, t, need) is None)


def smallest_neighbours(p: SecAggParams, sampled: int, fault: float = 0.0, need: int = 1, target: float = 0.01,
                        draws: int = DRAWS, seed: int = 0) -> tuple[int | None, float]:
    """(the smallest even k whose estimated attempt failure is at most ``target``, that
    failure); (None, the complete graph's failure) when no sparse graph reaches it (then the
    counts, not the graph, are what fails: see the chain of ``runtime/fault_outlook.py``)."""
    for k in range(2, sampled - 1, 2):
        q, _ = keeps(p, sampled, fault, need, k, draws, seed)
        if 1 - q <= target:
            return k, 1 - q
    q, _ = keeps(p, sampled, fault, need, None, draws, seed)
    return None, 1 - q


def estimate(p: SecAggParams, sampled: int, fault: float, need: int) -> Estimate | None:
    """The dropout outlook's estimate (``runtime/fault_outlook.py``): None where the counts
    decide (no ``neighbours``, a graph that is complete at this size, no per-phase dropout)."""
    k = p.neighbours
    if k is None or k >= sampled - 1 or not any(p.dropout.values()):
        return None
    q, se = keeps(p, sampled, fault, need)

    def advise(failure: float) -> str:
        best, fails = smallest_neighbours(p, sampled, fault, need, failure)
        if best is None:
            return (f"no sparse graph fails an attempt at most {failure:.3f} of the time (every client as neighbour: "
                    f"{fails:.3f}); fewer dropouts or a smaller threshold would")
        return f"neighbours {best} would fail an attempt about {fails:.3f} of the time (at most {failure:.3f} wanted)"

    return Estimate(q, se, f"neighbours {k}: estimated from {DRAWS:,} simulated attempts, neighbourhoods and the graph "
                    "counted", advise)


__all__ = ["DRAWS", "NONE", "attempt_fails", "estimate", "exact_keeps", "keeps", "smallest_neighbours"]
