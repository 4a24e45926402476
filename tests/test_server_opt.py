"""Server optimizers (Reddi et al. 2021): one step on known vectors, checked by hand;
the Algorithm's server state survives a state_dict round trip bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.aggregators.server_opt import (
    AdagradParams,
    AdaptiveParams,
    AvgMParams,
    SgdParams,
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    sgd,
)
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Update
from fedfm.core.protocols import RoundContext
from fedfm.core.types import flatten_groups, unflatten_groups
from fedfm.runtime.algorithm import build_algorithm

W = {"w": torch.tensor([1.0, -2.0])}
D = {"w": torch.tensor([0.1, -0.2])}


def close(a: torch.Tensor, expected: list[float]) -> bool:
    return torch.allclose(a, torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_sgd_lr1_is_fedavg_and_lr_scales():
    new, moments = sgd(W, D, {}, SgdParams())
    assert torch.equal(new["w"], W["w"] + D["w"]) and moments == {}
    new, _ = sgd(W, D, {}, SgdParams(lr=0.5))
    assert close(new["w"], [1.05, -2.1])


def test_fedavgm_two_steps():
    p = AvgMParams(lr=1.0, momentum=0.9)
    w1, mom = fedavgm(W, D, {}, p)
    assert close(mom["v"]["w"], [0.1, -0.2]) and close(w1["w"], [1.1, -2.2])
    # v = 0.9 * [0.1, -0.2] + [0.1, -0.2] = [0.19, -0.38]
    w2, mom = fedavgm(w1, D, mom, p)
    assert close(mom["v"]["w"], [0.19, -0.38]) and close(w2["w"], [1.29, -2.58])


def test_fedadam_one_step_by_hand():
    p = AdaptiveParams(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    new, mom = fedadam(W, D, {}, p)
    # m = 0.1 * d = [0.01, -0.02]
    assert close(mom["m"]["w"], [0.01, -0.02])
    # v = 0.99 * tau^2 + 0.01 * d^2 = [0.99e-6 + 1e-4, 0.99e-6 + 4e-4]
    assert close(mom["v"]["w"], [1.0099e-4, 4.0099e-4])
    # w += 0.1 * m / (sqrt(v) + tau):
    #   0.001 / (0.0100494 + 0.001) = 0.0905028;  -0.002 / (0.0200247 + 0.001) = -0.0951261
    assert close(new["w"], [1.0905028, -2.0951261])
    assert close(new["w"], [1.0 + 0.001 / (math.sqrt(1.0099e-4) + 1e-3), -2.0 - 0.002 / (math.sqrt(4.0099e-4) + 1e-3)])


def test_fedyogi_one_step_by_hand():
    p = AdaptiveParams(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # v_prev = tau^2 = 1e-6 < d^2, so sign(v_prev - d^2) = -1 and v = 1e-6 + 0.01 * d^2
    new, mom = fedyogi(W, D, {}, p)
    assert close(mom["v"]["w"], [1e-6 + 1e-4, 1e-6 + 4e-4])
    # A second step where v > d^2 decreases v: v = v - 0.01 * d'^2 with d' = 0.
    zero = {"w": torch.zeros(2)}
    _, mom2 = fedyogi(new, zero, mom, p)
    assert torch.equal(mom2["v"]["w"], mom["v"]["w"])  # d'^2 = 0: no change
    big = {"v": {"w": torch.tensor([1.0, 1.0])}, "m": {"w": torch.zeros(2)}}
    _, mom3 = fedyogi(W, D, big, p)
    assert close(mom3["v"]["w"], [1.0 - 0.01 * 0.01, 1.0 - 0.01 * 0.04])
    # w += 0.1 * 0.01 / (sqrt(1.01e-4) + 1e-3) = 0.0904988; -0.002 / (0.0200250 + 0.001)
    assert close(new["w"], [1.0904988, -2.0951249])


def test_fedadagrad_one_step_by_hand():
    p = AdagradParams(lr=0.1, tau=1e-3)  # beta1 = 0: m = d
    new, mom = fedadagrad(W, D, {}, p)
    assert close(mom["m"]["w"], [0.1, -0.2])
    assert close(mom["v"]["w"], [1e-6 + 0.01, 1e-6 + 0.04])
    # w += 0.1 * 0.1 / (0.100005 + 0.001) = 0.0990050;  -0.02 / (0.2000025 + 0.001) = -0.0995012
    assert close(new["w"], [1.0990050, -2.0995012])
    _, mom2 = fedadagrad(new, D, mom, p)  # v accumulates
    assert close(mom2["v"]["w"], [1e-6 + 0.02, 1e-6 + 0.08])


def test_server_optimizer_is_validated_before_training(tiny):
    with pytest.raises(ConfigError, match="server_optimizer.beta1"):
        from_dict({**tiny, "server_optimizer": {"name": "fedadam", "beta1": 1.5}})
    with pytest.raises(ConfigError, match="server_optimizer.name: unknown name 'adam'"):
        from_dict({**tiny, "server_optimizer": {"name": "adam"}})
    with pytest.raises(ConfigError, match="learner.mu"):
        from_dict({**tiny, "learner": {"name": "fedprox", "mu": -1}})
    with pytest.raises(ConfigError, match="learner.alpha"):
        from_dict({**tiny, "learner": {"name": "feddyn", "alpha": 0}})


def _updates(rnd: int, scaffold: bool) -> list[Update]:
    out = []
    for cid in range(2):
        g = torch.Generator().manual_seed(100 * rnd + cid)
        payload = {"a": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)}
        if scaffold:
            payload.update({"scaffold_c/" + k: torch.randn(v.shape, generator=g) for k, v in list(payload.items())})
        out.append(Update(cid=cid, payload=payload, num_examples=10 + cid))
    return out


@pytest.mark.parametrize(
    "learner,opt",
    [({"name": "scaffold"}, "fedadam"), ({"name": "feddyn", "alpha": 0.1}, "fedyogi"), ({"name": "local"}, "fedavgm")],
)
def test_server_state_round_trip_continues_bit_identically(tiny, learner, opt):
    exp = from_dict({**tiny, "learner": learner, "server_optimizer": {"name": opt, "lr": 0.05}})
    scaffold = learner["name"] == "scaffold"
    a = build_algorithm(exp)
    ctx = RoundContext(round=1, seed=0, generator=torch.Generator().manual_seed(0), num_clients=2)
    ss = a.init({"a": torch.zeros(3), "b": torch.ones(2, 2)})
    for rnd in (1, 2):
        ss, _ = a.aggregate(ss, _updates(rnd, scaffold), ctx)
    saved = flatten_groups({g: s for g, s in ss.items() if g != "model"})
    groups = {k.split("/")[0] for k in saved}
    expected = {"opt.v"} | ({"opt.m"} if opt != "fedavgm" else set())
    expected |= {"scaffold.c"} if scaffold else {"feddyn.h"} if learner["name"] == "feddyn" else set()
    assert groups == expected
    restored = {"model": {k: v.clone() for k, v in ss["model"].items()}, **unflatten_groups({k: v.clone() for k, v in saved.items()})}
    b = build_algorithm(exp)
    sa, _ = a.aggregate(ss, _updates(3, scaffold), ctx)
    sb, _ = b.aggregate(restored, _updates(3, scaffold), ctx)
    assert set(sa) == set(sb)
    for g in sa:
        for k in sa[g]:
            assert torch.equal(sa[g][k], sb[g][k]), (g, k)
