"""Defense server steps: centered clipping's state over two rounds, norm bounding, weak
DP, the Fed-FA-inspired filter, and the config-time refusals with their numbers."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedfm.aggregators import Pipeline, fedavg
from fedfm.aggregators.fedfa import FedFA, FedFAParams, indicators, outliers
from fedfm.aggregators.norm_bound import NormBound, NormBoundParams, WeakDP, WeakDPParams
from fedfm.config import ConfigError, from_dict
from fedfm.core.protocols import RoundContext
from fedfm.core.types import Update


def ups(*vals):
    return [Update(cid=i, payload={"w": torch.tensor([v])}, num_examples=10 * (i + 1)) for i, v in enumerate(vals)]


def ctx(rnd=1):
    return RoundContext(rnd, 0, torch.Generator().manual_seed(rnd), 3)


def test_centered_clip_state_across_two_rounds():
    pipe = Pipeline.from_specs([{"name": "centered_clip", "tau": 1.0}])
    server_state, metrics = {"model": {"w": torch.zeros(1)}}, {}
    # Round 1: v0 = 0; x - v = 0.5, 2, -3 -> clipped to 0.5, 1, -1; v1 = (0.5 + 1 - 1) / 3 = 1/6.
    out = pipe.run("updates", ups(0.5, 2.0, -3.0), server_state, ctx(1), metrics)
    assert [float(u.payload["w"]) for u in out] == [0.5, 1.0, -1.0]
    assert [u.num_examples for u in out] == [1, 1, 1]  # the paper's unweighted mean
    assert float(fedavg({"w": torch.zeros(1)}, [u.payload for u in out], [1, 1, 1])["w"]) == pytest.approx(1 / 6)
    assert float(server_state["step.0.centered_clip"]["w"]) == pytest.approx(1 / 6)
    assert metrics == {"centered_clip.clipped": 2, "centered_clip.mean_distance": pytest.approx(5.5 / 3)}
    # Round 2 starts from v1 = 1/6: x - v = 5/6, 4/3, 29/6 -> 5/6, 1, 1;
    # v2 = 1/6 + (5/6 + 1 + 1) / 3 = 1/6 + 17/18 = 20/18.
    out = pipe.run("updates", ups(1.0, 1.5, 5.0), server_state, ctx(2), metrics)
    assert float(server_state["step.0.centered_clip"]["w"]) == pytest.approx(20 / 18)
    assert float(fedavg({"w": torch.zeros(1)}, [u.payload for u in out], [1, 1, 1])["w"]) == pytest.approx(20 / 18)


def test_centered_clip_two_iterations_by_hand():
    # v0 = 0, tau = 1, x = 0.5, 2, -3: iteration 1 -> v = 1/6; iteration 2: x - v = 1/3, 11/6,
    # -19/6 -> 1/3, 1, -1 -> v = 1/6 + (1/3 + 1 - 1)/3 = 1/6 + 1/9 = 5/18.
    pipe = Pipeline.from_specs([{"name": "centered_clip", "tau": 1.0, "iters": 2}])
    server_state = {}
    pipe.run("updates", ups(0.5, 2.0, -3.0), server_state, ctx(1), {})
    assert float(server_state["step.0.centered_clip"]["w"]) == pytest.approx(5 / 18)


def test_norm_bound_and_weak_dp():
    u = [Update(cid=0, payload={"w": torch.tensor([3.0, 4.0])}, num_examples=1), Update(cid=1, payload={"w": torch.tensor([0.3, 0.4])}, num_examples=1)]
    out, _, m = NormBound(NormBoundParams(max_norm=1.0))(u, ctx(), {})
    # norm 5 -> scaled by 1/5 to (0.6, 0.8); norm 0.5 stays
    assert torch.allclose(out[0].payload["w"], torch.tensor([0.6, 0.8]))
    assert torch.equal(out[1].payload["w"], torch.tensor([0.3, 0.4]))
    assert m == {"bounded": 1}
    delta = {"w": torch.zeros(20000)}
    a, _, _ = WeakDP(WeakDPParams(std=0.1))(delta, ctx(3), {})
    b, _, _ = WeakDP(WeakDPParams(std=0.1))(delta, ctx(3), {})
    assert torch.equal(a["w"], b["w"])  # seeded by the round's generator
    assert abs(float(a["w"].std()) - 0.1) < 0.005 and abs(float(a["w"].mean())) < 0.005
    assert torch.equal(WeakDP(WeakDPParams(std=0.0))(delta, ctx(3), {})[0]["w"], delta["w"])


def test_fedfa_identity_curvature_by_hand():
    # x = 1.0, 1.1, 0.9, 1.0, 5.0; median 1.0; I = 0.5 (x - 1)^2 = 0, .005, .005, 0, 8
    # median(I) = 0.005, MAD = median(.005, 0, 0, .005, 7.995) = 0.005
    # limit = 0.005 + 2 * 1.4826 * 0.005 = 0.019826 -> only client 4 is discarded.
    u = ups(1.0, 1.1, 0.9, 1.0, 5.0)
    scores = indicators([x.payload for x in u], {"w": torch.ones(1, dtype=torch.float64)})
    assert torch.allclose(scores, torch.tensor([0.0, 0.005, 0.005, 0.0, 8.0], dtype=torch.float64))
    assert outliers(scores, 2.0) == [4]
    kept, state, m = FedFA(FedFAParams(curvature="identity"))(u, ctx(), {})
    assert [x.cid for x in kept] == [0, 1, 2, 3] and m["discarded"] == 1 and state == {}  # it keeps no state
    # MAD 0 (most clients identical): every score above the median is an outlier
    assert outliers(torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0], dtype=torch.float64), 2.0) == [4]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"federation.clients": 6, "aggregator": {"rule": "krum", "f": 2}}, "more than 2f \\+ 2 = 6 clients per round, got 6"),
        ({"federation.clients": 8, "federation.clients_per_round": 5, "aggregator": {"rule": "multi_krum", "f": 1, "m": 6}}, "m=6 updates but a round has 5"),
        ({"federation.clients": 8, "aggregator": {"rule": "bulyan", "f": 2}}, "at least 4f \\+ 3 = 11 clients per round, got 8"),
        ({"federation.clients": 4, "aggregator": {"rule": "trimmed_mean", "beta": 0.5}}, "k = floor\\(0.5 \\* 4\\) = 2 at each end; needs 2k < n = 4"),
        ({"aggregator": {"rule": "median"}, "server_steps": [{"name": "centered_clip", "tau": 1.0}]}, "centered_clip .* set aggregator.rule: fedavg"),
        ({"learner": {"name": "scaffold"}, "server_steps": [{"name": "fedfa"}]}, "a scaffold payload carries the learner's own tensors"),
        ({"model.task": "masked_lm", "server_steps": [{"name": "backdoor_asr"}]}, "backdoor_asr measures a classification backdoor"),
        ({"learner": {"name": "scaffold"}, "server_steps": [{"name": "norm_bound", "max_norm": 1.0}]}, "norm_bound bounds the norm .* control deltas"),
        ({"learner": {"name": "scaffold"}, "server_steps": [{"name": "clip_updates", "max_norm": 1.0}]}, "clip_updates bounds the norm"),
    ],
)
def test_refused_at_config_time_with_numbers(tmp_path, over, message):
    raw = tiny_config(tmp_path, **{"federation.partitioner": {"name": "iid"}, **over})
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_norm_bound_with_feddyn_and_scaffold_with_a_robust_rule_are_accepted(tmp_path):
    # feddyn sends the model delta only; scaffold's control deltas go through the rule itself
    raw = tiny_config(tmp_path, learner={"name": "feddyn"}, server_steps=[{"name": "norm_bound", "max_norm": 1.0}])
    assert from_dict(raw).learner.name == "feddyn"
    raw = tiny_config(tmp_path, learner={"name": "scaffold"}, aggregator={"rule": "median"})
    assert from_dict(raw).aggregator.rule == "median"


def test_accepted_when_the_numbers_work(tmp_path):
    # fedfa reads the round's model (RoundContext.model): any optimizer, later steps, local tensors
    raw = tiny_config(tmp_path, **{"server_steps": [{"name": "fedfa"}, {"name": "weak_dp", "std": 0.1}],
                                   "server_optimizer": {"name": "fedadam"}})
    assert [s["name"] for s in from_dict(raw).server_steps] == ["fedfa", "weak_dp"]
    raw = tiny_config(tmp_path, **{"federation.clients": 7, "federation.partitioner": {"name": "iid"}, "aggregator": {"rule": "bulyan", "f": 1}})
    assert from_dict(raw).aggregator.rule == "bulyan"
    raw = tiny_config(tmp_path, **{"federation.clients": 5, "federation.partitioner": {"name": "iid"}, "aggregator": {"rule": "krum", "f": 1}})
    assert from_dict(raw).aggregator.params() == {"f": 1}
