"""Client algorithms on a tiny random BERT: FedProx (mu = 0 is FedAvg bit for bit), FedDyn
and SCAFFOLD state in the client store, and their server updates on hand examples."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedfm.config import TrainConfig, from_dict
from fedfm.aggregators.fedavg import fedavg
from fedfm.aggregators.median import coordinate_median
from fedfm.core.types import Instruction, Update
from fedfm.learners import build_learner
from fedfm.aggregators.feddyn import FedDynServer, server_update
from fedfm.aggregators.scaffold import ScaffoldServer, server_control_update, split_payload
from fedfm.core.protocols import RoundContext
from fedfm.learners.feddyn import client_gradient_update
from fedfm.learners.scaffold import client_control_update
from fedfm.runtime.algorithm import build_algorithm
from fedfm.runtime.store import ClientStore
from fedfm.runtime.workbench import Workbench

from conftest import tiny_config


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    raw = tiny_config(tmp_path_factory.mktemp("learners"), **{"train.steps": 4})
    return Workbench(from_dict(raw))


def spec(name: str, **params):
    return type("Spec", (), {"name": name, "params": lambda self: params})()


def run(wb, learner, state, cid=0, rnd=1, store=None, broadcast=None, train=None):
    ctx = wb.context(cid, rnd, store=store)
    if train is not None:
        ctx = dataclasses.replace(ctx, train=train)
    return learner.local_update(Instruction(rnd, cid, state, broadcast=dict(broadcast or {})), ctx)


def round_ctx(n=4):
    return RoundContext(round=1, seed=0, generator=torch.Generator().manual_seed(0), num_clients=n)


# -- FedProx -------------------------------------------------------------------------


def test_fedprox_mu0_equals_fedavg_bit_for_bit(wb):
    state = wb.initial_state()
    plain = run(wb, build_learner(spec("local")), state)
    prox0 = run(wb, build_learner(spec("fedprox", mu=0.0)), state)
    assert set(plain.payload) == set(prox0.payload)
    for k in plain.payload:
        assert torch.equal(plain.payload[k], prox0.payload[k]), k
    assert plain.metrics == prox0.metrics
    # A strong proximal term really changes training and keeps the client nearer the server.
    prox = run(wb, build_learner(spec("fedprox", mu=10.0)), state)
    norm = lambda d: torch.sqrt(sum((v**2).sum() for v in d.values()))  # noqa: E731
    assert norm(prox.payload) < norm(plain.payload)


# -- FedDyn --------------------------------------------------------------------------


def test_feddyn_server_h_update_by_hand():
    # m = 4 clients in all, two returned with deltas [1, 2] and [3, -2]; alpha = 0.5.
    h = {"w": torch.tensor([0.2, 0.0])}
    mean = {"w": torch.tensor([2.0, 0.0])}  # the rule's mean (equal weights: also the plain one)
    h_new, pseudo = server_update(h, mean, 2, mean, alpha=0.5, num_clients=4)
    # h = [0.2, 0] - 0.5 * 2/4 * [2, 0] = [-0.3, 0];  pseudo = [2, 0] - h/0.5 = [2.6, 0]
    assert torch.allclose(h_new["w"], torch.tensor([-0.3, 0.0]))
    assert torch.allclose(pseudo["w"], torch.tensor([2.6, 0.0]))
    # The same through the server part, starting from h = 0: h = -0.125 * [4, 0].
    srv = FedDynServer(type("P", (), {"alpha": 0.5})(), num_clients=4)
    model = {"w": torch.zeros(2)}
    ss = {"model": model, **srv.init(model)}
    ups = [Update(0, {"w": torch.tensor([1.0, 2.0])}, 1), Update(1, {"w": torch.tensor([3.0, -2.0])}, 1)]
    groups, out = srv.combine_updates(ss, ups, fedavg, None, round_ctx())
    assert torch.allclose(groups["feddyn.h"]["w"], torch.tensor([-0.5, 0.0]))
    assert torch.allclose(out["w"], torch.tensor([3.0, 0.0]))
    g = client_gradient_update({"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, -4.0])}, alpha=0.5)
    assert torch.allclose(g["w"], torch.tensor([0.0, 3.0]))


def test_feddyn_h_follows_the_robust_rule_and_the_plain_mean_under_fedavg():
    # m = 10, alpha = 1; deltas 0, 1 and an attacker's 100, with 1, 1 and 8 examples.
    srv = FedDynServer(type("P", (), {"alpha": 1.0})(), num_clients=10)
    model = {"w": torch.zeros(1)}
    ss = {"model": model, **srv.init(model)}
    ups = [Update(0, {"w": torch.tensor([0.0])}, 1), Update(1, {"w": torch.tensor([1.0])}, 1),
           Update(2, {"w": torch.tensor([100.0])}, 8)]
    groups, _ = srv.combine_updates(ss, ups, coordinate_median, None, round_ctx())
    assert torch.allclose(groups["feddyn.h"]["w"], torch.tensor([-0.3]))  # -1 * 3/10 * median 1
    groups, out = srv.combine_updates(ss, ups, fedavg, None, round_ctx())
    assert torch.allclose(groups["feddyn.h"]["w"], torch.tensor([-10.1]))  # -(0 + 1 + 100)/10: the paper's sum
    assert torch.allclose(out["w"], torch.tensor([90.2]))  # example-weighted mean 801/10 = 80.1, minus h/alpha


def test_feddyn_keeps_the_previous_gradient_in_the_store(wb, tmp_path):
    store = ClientStore(tmp_path / "clients")
    learner = build_learner(spec("feddyn", alpha=0.1))
    state = wb.initial_state()
    first = run(wb, learner, state, store=store)
    g1 = store.get(0, "feddyn_grad")
    for k in state:  # g starts at 0: g = -alpha * delta
        assert torch.allclose(g1[k], -0.1 * first.payload[k])
    second = run(wb, learner, state, rnd=2, store=store)
    g2 = store.get(0, "feddyn_grad")
    for k in state:
        assert torch.allclose(g2[k], g1[k] - 0.1 * second.payload[k])
    assert store.keys(1) == []  # the other client was never touched
    with pytest.raises(ValueError, match="client store"):
        run(wb, learner, state, store=None)


# -- SCAFFOLD ------------------------------------------------------------------------


def test_scaffold_control_variates_by_hand():
    c_i = {"w": torch.tensor([0.5, -1.0])}
    c = {"w": torch.tensor([1.0, 1.0])}
    delta = {"w": torch.tensor([-0.2, 0.4])}  # y - x after K = 4 steps of lr 0.1
    new, dc = client_control_update(c_i, c, delta, steps=4, lr=0.1)
    # c_i+ = c_i - c + (x - y)/(K lr) = [0.5 - 1 + 0.5, -1 - 1 - 1] = [0, -3]
    assert torch.allclose(new["w"], torch.tensor([0.0, -3.0]))
    assert torch.allclose(dc["w"], torch.tensor([-0.5, -2.0]))
    # c <- c + |S|/N mean(dc): N = 10, two clients returned dc = [-0.5, -2] and [1.5, 0]
    mean = {"w": (dc["w"] + torch.tensor([1.5, 0.0])) / 2}  # fedavg of the two: [0.5, -1]
    c_new = server_control_update(c, mean, kept=2, num_clients=10)
    assert torch.allclose(c_new["w"], torch.tensor([1.1, 0.8]))


def test_scaffold_server_part_and_payload_template():
    srv = ScaffoldServer(None, num_clients=4)
    state = {"w": torch.zeros(2)}
    ss = {"model": state, **srv.init(state)}
    assert torch.equal(srv.broadcast(ss)["scaffold_c"]["w"], torch.zeros(2))
    assert set(srv.payload_spec(state)) == {"w", "scaffold_c/w"}
    payloads = [{"w": torch.ones(2), "scaffold_c/w": torch.tensor([4.0, 8.0])}]
    groups, out = srv.combine_updates(ss, [Update(0, payloads[0], 5)], fedavg, None, round_ctx())
    assert torch.equal(out["w"], torch.ones(2))
    assert torch.allclose(groups["scaffold.c"]["w"], torch.tensor([1.0, 2.0]))
    assert split_payload(payloads[0])[1].keys() == {"w"}


def test_scaffold_c_follows_the_robust_rule():
    # N = 10; control deltas 0, 1 and an attacker's 1000: the median moves c by 3/10 * 1.
    srv = ScaffoldServer(None, num_clients=10)
    model = {"w": torch.zeros(1)}
    ss = {"model": model, **srv.init(model)}
    ups = [Update(i, {"w": torch.zeros(1), "scaffold_c/w": torch.tensor([v])}, 1) for i, v in enumerate([0.0, 1.0, 1000.0])]
    groups, _ = srv.combine_updates(ss, ups, coordinate_median, None, round_ctx())
    assert torch.allclose(groups["scaffold.c"]["w"], torch.tensor([0.3]))
    groups, _ = srv.combine_updates(ss, ups, fedavg, None, round_ctx())
    assert torch.allclose(groups["scaffold.c"]["w"], torch.tensor([100.1]))  # the paper's sum / N


def test_scaffold_client_store_and_option2_equals_mean_gradient_under_sgd(wb, tmp_path):
    state = wb.initial_state()
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    sgd = TrainConfig(optimizer="sgd", lr=0.05, steps=4, batch_size=8, max_grad_norm=None)
    results = {}
    for mode in ("delta", "mean_grad"):
        store = ClientStore(tmp_path / mode)
        learner = build_learner(spec("scaffold", control_update=mode))
        upd = run(wb, learner, state, store=store, broadcast={"scaffold_c": zeros}, train=sgd)
        model, dc = split_payload(upd.payload)
        assert set(model) == set(state) and set(dc) == set(state)
        c_i = store.get(0, "scaffold_c")
        for k in state:  # c_i started at 0, so delta_c = c_i+
            assert torch.equal(dc[k], c_i[k])
        results[mode] = (model, c_i, upd.metrics["steps"])
    (m1, c1, steps), (m2, c2, _) = results["delta"], results["mean_grad"]
    for k in state:
        assert torch.equal(m1[k], m2[k])  # the control update mode does not change training
        assert torch.allclose(c1[k], -m1[k] / (steps * 0.05))
        assert torch.allclose(c1[k], c2[k], atol=1e-6, rtol=1e-3)  # (x - y)/(K lr) = mean gradient
    # A nonzero correction c - c_i changes the local trajectory.
    store = ClientStore(tmp_path / "corrected")
    shifted = {k: torch.full_like(v, 0.01) for k, v in state.items()}
    upd = run(wb, build_learner(spec("scaffold")), state, store=store, broadcast={"scaffold_c": shifted}, train=sgd)
    assert any(not torch.equal(split_payload(upd.payload)[0][k], m1[k]) for k in state)


def test_algorithm_round_with_scaffold_updates_server_c(tmp_path):
    exp = from_dict(tiny_config(tmp_path, learner={"name": "scaffold"}))
    algo = build_algorithm(exp)
    ss = algo.init({"w": torch.zeros(2)})
    inst = algo.configure(1, ss, [type("C", (), {"cid": 0})(), type("C", (), {"cid": 1})()])
    assert sorted(inst) == [0, 1] and torch.equal(inst[0].broadcast["scaffold_c"]["w"], torch.zeros(2))
    from fedfm.core.types import Update

    ups = [
        Update(0, {"w": torch.tensor([1.0, 0.0]), "scaffold_c/w": torch.tensor([2.0, 2.0])}, 1),
        Update(1, {"w": torch.tensor([3.0, 0.0]), "scaffold_c/w": torch.tensor([0.0, 2.0])}, 1),
    ]
    new, _ = algo.aggregate(ss, ups, round_ctx(n=2))
    assert torch.allclose(new["model"]["w"], torch.tensor([2.0, 0.0]))  # mean delta, sgd lr 1
    assert torch.allclose(new["scaffold.c"]["w"], torch.tensor([1.0, 2.0]))  # (2+0, 2+2)/N=2
    assert torch.equal(ss["scaffold.c"]["w"], torch.zeros(2))  # the old server state is untouched
