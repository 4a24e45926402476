"""Client clustering: IFCA's choice and cluster means, update-similarity clustering, purity."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedfm.config import ConfigError, from_dict
from fedfm.core.protocols import RoundContext
from fedfm.core.types import ClientSpec, Instruction, Update
from fedfm.peft import get_state
from fedfm.personalize.cluster_report import ClusterReport, ClusterReportParams
from fedfm.personalize.clustering import cluster_updates, ifca_choice, purity
from fedfm.personalize.ifca import WEIGHT, IFCALearner, IFCAParams, IFCAServer, roles_for_clusters
from fedfm.runtime import LocalRuntime
from fedfm.runtime.checkpoint import Checkpointer
from fedfm.runtime.workbench import Workbench


def test_ifca_choice_on_constructed_losses():
    assert ifca_choice([0.9, 0.4, 0.7]) == 1
    assert ifca_choice([0.5, 0.5, 0.6]) == 0  # tie: the lowest index
    assert ifca_choice([math.nan, 0.3]) == 1  # a NaN loss is never chosen
    with pytest.raises(ValueError):
        ifca_choice([])


def test_ifca_learner_trains_the_model_it_chose(tmp_path, tiny):
    exp = from_dict(tiny, overrides=["train.steps=1"])
    wb = Workbench(exp)
    shared = wb.initial_state()
    other = {k: v + 0.5 for k, v in shared.items()}
    inst = Instruction(round=1, cid=0, state=shared, broadcast={"model.1": other})
    learner = IFCALearner(IFCAParams(k=2))
    learner.losses = lambda models, ctx: [0.8, 0.2]  # constructed: cluster 1 fits better
    update = learner.local_update(inst, wb.context(0, 1))
    n = len(wb.examples(0))
    assert update.meta["cluster"] == "1"
    assert update.payload[WEIGHT].tolist() == [0.0, float(n)]
    # the delta is taken from cluster 1's model: trained - other
    trained = get_state(wb.model)
    assert all(torch.allclose(other[k] + update.payload[k], trained[k], atol=1e-6) for k in shared)


def test_ifca_server_moves_each_cluster_by_its_own_mean():
    server = IFCAServer(IFCAParams(k=3, init_std=0.0), num_clients=3)
    model = {"w": torch.tensor([0.0, 0.0])}
    state = {"model": model, **server.init(model)}
    assert set(state) == {"model", "model.1", "model.2"}
    payloads = [
        {"w": torch.tensor([1.0, 1.0]), WEIGHT: torch.tensor([3.0, 0.0, 0.0])},
        {"w": torch.tensor([3.0, 3.0]), WEIGHT: torch.tensor([1.0, 0.0, 0.0])},
        {"w": torch.tensor([10.0, 0.0]), WEIGHT: torch.tensor([0.0, 2.0, 0.0])},
    ]
    groups, delta0 = server.combine(state, payloads, {}, None)
    # cluster 0: (3 * [1, 1] + 1 * [3, 3]) / 4 = [1.5, 1.5] (to the server optimizer)
    assert delta0["w"].tolist() == [1.5, 1.5]
    assert groups["model.1"]["w"].tolist() == [10.0, 0.0]  # only client 2 chose cluster 1
    assert groups["model.2"]["w"].tolist() == [0.0, 0.0]  # nobody chose cluster 2: unchanged
    with pytest.raises(ValueError, match="one positive entry"):
        server.combine(state, [{"w": torch.zeros(2), WEIGHT: torch.tensor([1.0, 1.0, 0.0])}], {}, None)


def test_update_similarity_clustering_on_constructed_updates():
    # Two directions: x (clients 0, 1) and y (clients 2, 3); client 1's update is 100x longer.
    # Start: centre 0 = update 0; update 3 is least similar to it (cos ~ 0.03) -> centre 1.
    # Assign by cosine: 0, 1 -> centre 0; 2 (cos with 3 ~ 0.995), 3 -> centre 1.
    ups = [
        {"a": torch.tensor([1.0, 0.1]), "b": torch.tensor([0.0])},
        {"a": torch.tensor([200.0, 0.0]), "b": torch.tensor([10.0])},
        {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.1])},
        {"a": torch.tensor([0.1, 3.0]), "b": torch.tensor([0.0])},
    ]
    assert cluster_updates(ups, 2) == [0, 0, 1, 1]
    assert cluster_updates(ups, 1) == [0, 0, 0, 0]
    # purity: cluster 0 = {x, x} -> 2; cluster 1 = {y, x} -> 1; (2 + 1) / 4 = 0.75
    assert purity({0: 0, 1: 0, 2: 1, 3: 1}, {0: "x", 1: "x", 2: "y", 3: "x"}) == 0.75
    assert purity({0: 0, 1: 0, 2: 1, 3: 1}, {0: "x", 1: "x", 2: "y", 3: "y"}) == 1.0


def test_cluster_report_clusters_after_warmup_and_keeps_the_assignment():
    ups = [
        Update(cid=c, payload={"w": torch.tensor(v)}, num_examples=1)
        for c, v in [(3, [1.0, 0.0]), (0, [0.0, 1.0]), (1, [2.0, 0.1]), (2, [0.1, 2.0])]
    ]
    clients = [ClientSpec(c, [], {"lang": "en" if c in (1, 3) else "fr"}) for c in range(5)]
    step = ClusterReport(ClusterReportParams(source="updates", k=2, warmup=2, truth_profile="lang"))
    ctx = lambda rnd: RoundContext(rnd, 0, torch.Generator(), 5, clients)  # noqa: E731
    _, state, m = step(ups, ctx(1), {})
    assert m["assigned"] == 0 and state["assign"].tolist() == [-1] * 5  # still warming up
    _, state, m = step(ups, ctx(2), state)
    # update of client 3 starts cluster 0; client 0's is least similar -> cluster 1
    assert state["assign"].tolist() == [1, 0, 1, 0, -1]
    assert m["purity"] == 1.0 and m["sizes"] == [2, 2]
    flipped = [Update(u.cid, {"w": u.payload["w"].flip(0)}, 1) for u in ups]
    _, state, _ = step(flipped, ctx(3), state)  # clustered once: kept
    assert state["assign"].tolist() == [1, 0, 1, 0, -1]


def test_roles_for_clusters():
    roles = roles_for_clusters({0: "fr", 1: "en", 2: "fr"})
    assert roles == [
        {"name": "cluster_0", "cids": [1], "profile": {"cluster": 0}},
        {"name": "cluster_1", "cids": [0, 2], "profile": {"cluster": 1}},
    ]


def test_ifca_run_checkpoints_assignments(tmp_path, tiny):
    tiny["learner"] = {"name": "ifca", "k": 2, "init_std": 0.05, "assign_examples": 16}
    tiny["server_steps"] = [{"name": "cluster_report", "truth_column": "label"}]
    out = tmp_path / "run"
    rt = LocalRuntime(from_dict(tiny, overrides=["rounds=2", "train.steps=1"]), out)
    rt.run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["cluster_report.assigned"] == 2
    assert 0.5 <= rows[2]["cluster_report.purity"] <= 1.0
    ck = Checkpointer(out, 1).load_latest()
    assert ck.algorithm["step.0.cluster_report/assign"].tolist() == rows[2]["cluster_report.assign"]
    assert any(k.startswith("model.1/") for k in ck.algorithm)
    # the downlink carried two models to each client
    n = sum(t.numel() for t in rt.wb.initial_state().values())
    assert rows[1]["bytes_down"] > 2 * 2 * n * 4


def test_ifca_refuses_other_rules(tmp_path, tiny):
    tiny["learner"] = {"name": "ifca"}
    tiny["aggregator"] = {"rule": "median"}
    with pytest.raises(ConfigError, match="ifca"):
        from_dict(tiny)
