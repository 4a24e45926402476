"""SecAgg+'s dropout outlook (``privacy/secagg/outlook.py``): which dropouts end an attempt,
the same verdicts as real rounds, the exact probability by hand, the simulation near it,
the smallest neighbours, and the warning of ``fedfm check``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedfm.config import from_dict
from fedfm.privacy.secagg import graph
from fedfm.privacy.secagg.outlook import NONE, attempt_fails, exact_keeps, keeps, smallest_neighbours
from fedfm.privacy.secagg.params import PHASES, SecAggParams, dropout_stages
from fedfm.runtime.fault_outlook import chain_keeps, dropout_outlook

from conftest import tiny_config
from test_secagg_plus import config, run

TRAIN, UNMASK = PHASES.index("train"), PHASES.index("unmask")


def drops(n: int, **phase_of: list[int]) -> np.ndarray:
    """Clients 0..n-1 in ring order; ``train=[1]`` drops client 1 in the train phase."""
    out = np.full(n, NONE)
    for phase, cids in phase_of.items():
        out[cids] = PHASES.index(phase)
    return out


def test_which_dropouts_end_an_attempt_by_hand():
    # the ring 0-1-2-3-4-5-0 (k = 2, t = 2), as test_secagg_plus's real rounds find them
    assert attempt_fails(drops(6, train=[1, 4]), 2, 2) == "masked inputs cut apart in the graph"
    assert attempt_fails(drops(6, train=[1, 2]), 2, 2) == "a dropped client's mask key below t holders"  # 1's key: 0 only
    assert attempt_fails(drops(6, train=[1, 4]), 4, 3) is None  # k = 4: 0-2-3-5 linked, 3 holders of every secret
    assert attempt_fails(drops(6, unmask=[0, 2]), 2, 2) == "a survivor's self-mask seed below t holders"  # 1's: itself only
    assert attempt_fails(drops(6, unmask=[0, 3]), 2, 2) is None
    assert attempt_fails(drops(6, train=[1], unmask=[3]), 2, 2) == "a survivor's self-mask seed below t holders"  # 2's
    # one cut leaves a path: 1 out, then 0-5-4-3-2 still linked
    assert attempt_fails(drops(6, train=[1]), 2, 2) is None
    # the counts first, as the phases check them
    assert attempt_fails(drops(6, share=[0, 1, 2, 3, 4]), 2, 2) == "fewer than t = 2 shared"
    assert attempt_fails(drops(6, train=[0, 1]), None, 5) == "fewer than 5 masked inputs"
    assert attempt_fails(drops(6), 2, 2, need=7) == "fewer than 7 masked inputs"
    assert attempt_fails(drops(6, unmask=[0, 1]), None, 4) is None  # every client a neighbour: 4 answers suffice


@pytest.mark.parametrize("phase_of,failed", [
    ({"unmask": [0, 2]}, "1 shares of client 1's self-mask seed, fewer than the threshold 2"),
    ({"unmask": [0, 3]}, None),
    ({"train": [1], "unmask": [3]}, "1 shares of client 2's self-mask seed, fewer than the threshold 2"),
])
def test_the_verdicts_are_the_real_rounds(tmp_path, monkeypatch, phase_of, failed):
    monkeypatch.setattr(graph, "ring_order", lambda ids, roster: sorted(ids))  # the ring 0-1-2-3-4-5-0
    drop = [{"phase": ph, "cids": cids} for ph, cids in phase_of.items()]
    raw = config(tmp_path, {"neighbours": 2, "drop": drop}, **{"federation.on_too_few": "skip", "federation.max_retries": 0})
    _, rows = run(raw, tmp_path / "run")
    assert bool(rows[1]["skipped"]) == (failed is not None) == (attempt_fails(drops(6, **phase_of), 2, 2) is not None)
    assert rows[1].get("secagg_unmask.failed") == (failed and f"secagg: {failed}")


def test_the_keep_probability_by_hand():
    p = SecAggParams(bound=1.0, neighbours=2, dropout={"unmask": 0.1})
    # 7 clients on a ring, t = 2 of 3 holders: an attempt finishes unless two of the clients
    # that drop at unmasking are at most 2 places apart; pairs 3 apart: 7, no such triple
    by_hand = 0.9**7 + 7 * 0.1 * 0.9**6 + 7 * 0.1**2 * 0.9**5
    assert exact_keeps(p, 7) == pytest.approx(by_hand, abs=1e-12)
    assert by_hand == pytest.approx(0.8916399, abs=1e-9)
    q, se = keeps(p, 7)
    assert abs(q - by_hand) < 3 * se and se == pytest.approx(math.sqrt(q * (1 - q) / 4000))
    # every client every other's neighbour: the counts decide, and the chain is exact
    plain = SecAggParams(bound=1.0, dropout={"train": 0.05, "unmask": 0.1})
    assert exact_keeps(plain, 6) == pytest.approx(chain_keeps(6, 1, 0.0, lambda n: dropout_stages(plain, n)), abs=1e-12)
    # faults.dropout first: 1 of 3 leaves 2 (t = 2 of 2 holders with k = 2): no later dropout, so
    # an attempt keeps with P[at least 2 of 3 stay] = 0.8^3 + 3 * 0.8^2 * 0.2
    q, se = keeps(SecAggParams(bound=1.0, neighbours=2, dropout={"unmask": 0.0}), 3, fault=0.2)
    assert abs(q - (0.8**3 + 3 * 0.8**2 * 0.2)) < 3 * se


def test_the_smallest_neighbours():
    p = SecAggParams(bound=1.0, dropout={"unmask": 0.1})
    # exactly, at 7 clients: k = 2 fails 0.108 (t = 2), k = 4 fails 0.150 (t = 4 of 5), every
    # client 0.026 (t = 5 of 7): the larger k needs more holders, so failure is not monotone
    assert 1 - exact_keeps(p, 7, k=4) == pytest.approx(0.1496944, abs=1e-7)
    k, fails = smallest_neighbours(p, 7, target=0.13)
    assert k == 2 and abs(fails - (1 - exact_keeps(p, 7, k=2))) < 0.015
    k, fails = smallest_neighbours(p, 7, target=0.1)
    assert k is None and abs(fails - (1 - exact_keeps(p, 7, k=None))) < 0.01


def test_fedfm_check_warns_with_the_neighbourhoods(tmp_path):
    secagg = [{"name": "secagg", "bound": 8.0, "neighbours": 2, "dropout": {"unmask": 0.5}}]
    raw = tiny_config(tmp_path, exchanges=secagg, **{"federation.clients": 5})
    (line,) = dropout_outlook(from_dict(raw))
    # 5 on a ring, t = 2 of 3: finishes only with at most one dropped, 6/32; every client a
    # neighbour (t = 4 of 5) is no better, so no sparse graph reaches 0.05^(1/4) = 0.473
    q, se = keeps(SecAggParams(bound=8.0, neighbours=2, dropout={"unmask": 0.5}), 5)
    assert abs(q - 6 / 32) < 3 * se
    assert f"an attempt keeps that many with probability about {q:.3f} (± {se:.3f}; neighbours 2: estimated from 4,000" in line
    assert f"a round is skipped with probability {(1 - q) ** 4:.3f}" in line
    assert "no sparse graph fails an attempt at most 0.473 of the time (every client as neighbour: " in line
    # the same without per-phase dropout: nothing depends on where clients sit, no estimate
    quiet = [{"name": "secagg", "bound": 8.0, "neighbours": 2}]
    assert dropout_outlook(from_dict(tiny_config(tmp_path, exchanges=quiet, **{"federation.clients": 5}))) == []
