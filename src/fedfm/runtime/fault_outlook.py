"""What ``faults.dropout`` does to the rounds, said before training (``fedfm check``, ``fedfm run``).

A round needs ``need`` accepted updates (``federation.min_clients``, or more where the
aggregator's rule or the learner's server part combines more: Krum's ``2f + 3``, FedBPT's
every sampled client; ``runtime/algorithm.fewest_combined``). With ``k`` clients sampled
and each dropping out independently with probability ``p`` (``runtime/faults.py``), an
attempt keeps at least ``need`` with probability

    q = sum_{j = need..k} C(k, j) (1 - p)^j p^(k - j)

and the round is skipped after ``1 + federation.max_retries`` failed attempts with
probability ``(1 - q)^(1 + max_retries)``. Dropout alone is counted: a straggler deadline,
a failed or a rejected client only make it worse. Written by hand: a binomial tail, no
library needed.
"""

from __future__ import annotations

from math import comb

SKIP_WARNING = 0.05  # warn when a round is skipped with at least this probability


def attempt_keeps(k: int, need: int, p: float) -> float:
    """Probability that at least ``need`` of ``k`` clients stay when each drops with ``p``."""
    return sum(comb(k, j) * (1 - p) ** j * p ** (k - j) for j in range(max(need, 0), k + 1))


def dropout_outlook(exp) -> list[str]:
    """A warning when dropout makes a skipped round likely (at least ``SKIP_WARNING``)."""
    p = exp.faults.dropout
    if p <= 0:
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
    q = attempt_keeps(k, need, p)
    skip = (1 - q) ** (1 + fed.max_retries)
    if skip < SKIP_WARNING:
        return []
    return [f"faults.dropout {p:g}: a round needs {need} of its {k} sampled clients ({why}); an attempt keeps that many "
            f"with probability {q:.3f}, so with federation.max_retries {fed.max_retries} a round is skipped with "
            f"probability {skip:.3f} (about {skip * exp.rounds:.1f} of {exp.rounds} rounds), from dropout alone"]


__all__ = ["attempt_keeps", "dropout_outlook"]
