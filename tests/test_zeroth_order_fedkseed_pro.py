"""FedKSeed-Pro: seed probabilities from the amplitude history, by hand; the server draws
each client's seeds from them, the clients step along exactly those seeds, and a resumed
run continues the statistics."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.aggregators.fedkseed_pro import add_scores, draw_seeds, init_scores, seed_probabilities
from fedfm.aggregators.zo_replay import replay, seed_pool
from fedfm.config import from_dict
from fedfm.core.types import MODEL
from fedfm.runtime.local import LocalRuntime

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

K, STEPS = 8, 3


def test_probabilities_by_hand_on_a_constructed_history():
    # K = 3, clip 1.0. Client A sends seed 0 twice (g = 0.5, -0.5) and seed 1 once (g = 3.0,
    # clipped to 1.0); seed 2 is never sent. With the initial entry 0 in every history:
    #   psi_0 = (0 + 0.5 + 0.5) / 3 = 1/3,  psi_1 = (0 + 1.0) / 2 = 1/2,  psi_2 = 0 / 1 = 0
    #   min-max normalised: [2/3, 1, 0]
    #   softmax: e^(2/3) = 1.947734, e^1 = 2.718282, e^0 = 1, sum 5.666016
    #   p = [0.343757, 0.479752, 0.176491]
    scores = add_scores(init_scores(3), torch.tensor([0, 1, 0]), torch.tensor([0.5, 3.0, -0.5]), clip=1.0)
    assert scores["amp"].tolist() == [1.0, 1.0, 0.0] and scores["count"].tolist() == [3.0, 2.0, 1.0]
    p = seed_probabilities(scores)
    total = math.exp(2 / 3) + math.e + 1.0
    assert p.tolist() == pytest.approx([math.exp(2 / 3) / total, math.e / total, 1 / total], abs=1e-9)
    assert p.tolist() == pytest.approx([0.343757, 0.479752, 0.176491], abs=1e-6)
    # no history: every psi is 0, the normalised scores are 0, p is uniform
    assert seed_probabilities(init_scores(4)).tolist() == [0.25] * 4
    # the draw is a pure function of (probabilities, steps, run seed, pool seed, round, client)
    a, b = draw_seeds(p, 50, 0, 0, 2, 1), draw_seeds(p, 50, 0, 0, 2, 1)
    assert torch.equal(a, b) and not torch.equal(a, draw_seeds(p, 50, 0, 0, 2, 0)) and int(a.max()) <= 2
    assert not torch.equal(a, draw_seeds(p, 50, 1, 0, 2, 1))  # another run seed, another draw


def pro_raw(tmp_path, rounds):
    raw = tiny_config(tmp_path, rounds=rounds)
    raw["peft"] = {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["query"]}
    raw["learner"] = {"name": "fedkseed", "num_seeds": K, "steps": STEPS, "lr": 1e-3, "eps": 1e-3,
                      "seed_sampling": "score", "cache": True}
    raw["server_steps"] = [{"name": "non_state_payload"}]
    return raw


def used(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(row).flatten().tolist())


def test_clients_step_along_the_seeds_the_server_drew(tmp_path):
    from fedfm.runtime.workbench import Workbench

    wb = Workbench(from_dict(pro_raw(tmp_path, 2)))
    one = LocalRuntime(from_dict(pro_raw(tmp_path, 1)), tmp_path / "run", workbench=wb)
    one.run()
    g1 = one.loop.server_state["fedkseed.history"]
    cids = sorted(c.cid for c in wb.clients)
    # round 1: no history, uniform probabilities; the history row's nonzero seeds are the draws
    d1 = [draw_seeds(torch.full((K,), 1.0 / K, dtype=torch.float64), STEPS, 0, 0, 1, c) for c in cids]
    assert used(g1["coef"][0]) == set(torch.cat(d1).tolist())
    assert torch.equal(g1["count"], 1.0 + torch.bincount(torch.cat(d1), minlength=K).double())
    # round 2 (resumed): drawn from the scores after round 1
    p2 = seed_probabilities({"amp": g1["amp"], "count": g1["count"]})
    assert not torch.allclose(p2, torch.full((K,), 1.0 / K, dtype=torch.float64))
    d2 = [draw_seeds(p2, STEPS, 0, 0, 2, c) for c in cids]
    two = LocalRuntime(from_dict(pro_raw(tmp_path, 2)), tmp_path / "run", resume=True, workbench=wb)
    two.run()
    g2 = two.loop.server_state["fedkseed.history"]
    assert used(g2["coef"][1]) == set(torch.cat(d2).tolist())
    assert torch.equal(g2["count"], g1["count"] + torch.bincount(torch.cat(d2), minlength=K).double())
    # the model is still the replay of the history
    rebuilt = replay(wb.initial_state(), g2["coef"], seed_pool(0, K))
    assert all(torch.equal(rebuilt[k], two.loop.server_state[MODEL][k]) for k in rebuilt)
