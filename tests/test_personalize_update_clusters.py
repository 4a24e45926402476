"""update_clusters: clustering after a warm-up, one model per cluster, served per client."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.aggregators.fedavg import fedavg
from fedfm.config import ConfigError, from_dict
from fedfm.core.protocols import RoundContext
from fedfm.core.types import ClientSpec, Instruction, Update
from fedfm.peft import get_state
from fedfm.personalize.cluster_eval import client_accuracies, summary
from fedfm.personalize.cluster_report import NOTES
from fedfm.personalize.clustering import align_labels
from fedfm.personalize.update_clusters import (
    ANCHOR,
    GROUP,
    UpdateClustersLearner,
    UpdateClustersParams,
    UpdateClustersServer,
)
from fedfm.runtime import LocalRuntime
from fedfm.runtime.checkpoint import Checkpointer
from fedfm.runtime.workbench import Workbench

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
CLIENTS = [ClientSpec(c, [], {}) for c in range(5)]


def up(cid: int, delta: list[float], n: int) -> Update:
    return Update(cid=cid, payload={"w": torch.tensor(delta)}, num_examples=n)


def aggregate(server, state, updates, rnd):
    """What FedAlgorithm.aggregate does with a server part's combine_updates and sgd lr 1."""
    ctx = RoundContext(rnd, 0, torch.Generator(), 5, CLIENTS)
    groups, delta = server.combine_updates(state, updates, fedavg, None, ctx)
    new = {**state, **groups}
    new["model"] = {n: state["model"][n] + delta[n] for n in state["model"]}
    return new, ctx.notes[NOTES]


def clustered(start: str, recluster: str = "never"):
    """Round 1 (warm-up): deltas [1,0] [3,0] [0,1] [0,3] -> model [1, 1]. Round 2 clusters:
    client 0 [2,0] (1 example), 1 [4,0] (3), 2 [0,1] (2), 3 [0,2] (2); client 4 never seen."""
    server = UpdateClustersServer(UpdateClustersParams(k=2, warmup_rounds=2, start=start, recluster=recluster), 5)
    model = {"w": torch.tensor([0.0, 0.0])}
    state = {"model": model, **server.init(model)}
    state, notes = aggregate(server, state, [up(0, [1, 0], 1), up(1, [3, 0], 1), up(2, [0, 1], 1), up(3, [0, 3], 1)], 1)
    assert notes["event"] == "warmup" and notes["assign"].tolist() == [-1] * 5
    assert state["model"]["w"].tolist() == [1.0, 1.0]
    state, notes = aggregate(server, state, [up(0, [2, 0], 1), up(1, [4, 0], 3), up(2, [0, 1], 2), up(3, [0, 2], 2)], 2)
    return server, state, notes


def test_constructed_updates_give_the_expected_clusters_and_first_models():
    # k-means: centre 0 = client 0's update (x); the least similar (cos 0) is client 2 -> centre 1.
    server, state, notes = clustered("global")
    assert notes["event"] == "clustered" and notes["clustered"] == 2
    assert state[GROUP]["assign"].tolist() == [0, 0, 1, 1, -1]
    assert state[ANCHOR]["w"].tolist() == [1.0, 1.0]  # the model round 2 started from
    # start: global: every cluster = [1, 1] + (1*[2,0] + 3*[4,0] + 2*[0,1] + 2*[0,2]) / 8 = [2.75, 1.75]
    assert state["model"]["w"].tolist() == [2.75, 1.75]
    assert state["model.1"]["w"].tolist() == [2.75, 1.75]
    assert torch.allclose(state[GROUP]["centres"], torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    # start: cluster_mean (FL-TAC): cluster 0 = [1,1] + (1*[2,0] + 3*[4,0]) / 4 = [4.5, 1];
    # cluster 1 = [1,1] + (2*[0,1] + 2*[0,2]) / 4 = [1, 2.5]
    _, state, _ = clustered("cluster_mean")
    assert state["model"]["w"].tolist() == [4.5, 1.0]
    assert state["model.1"]["w"].tolist() == [1.0, 2.5]


def test_too_few_updates_postpone_the_clustering():
    server = UpdateClustersServer(UpdateClustersParams(k=2, warmup_rounds=1), 5)
    model = {"w": torch.tensor([0.0, 0.0])}
    state = {"model": model, **server.init(model)}
    state, notes = aggregate(server, state, [up(0, [1, 0], 1)], 1)  # 1 update < k = 2
    assert notes["event"] == "warmup" and int(state[GROUP]["clustered"][0]) == 0
    state, notes = aggregate(server, state, [up(0, [1, 0], 1), up(3, [0, 1], 1)], 2)
    assert notes["event"] == "clustered" and state[GROUP]["assign"].tolist() == [0, -1, -1, 1, -1]


def test_each_cluster_model_is_its_members_weighted_mean_applied_to_it():
    server, state, _ = clustered("global")
    # round 3, 2 + 2 clients, each sent its cluster's model [2.75, 1.75]:
    # cluster 0: (1*[1,0] + 3*[3,0]) / 4 = [2.5, 0]  -> [5.25, 1.75]
    # cluster 1: (1*[0,2] + 1*[0,4]) / 2 = [0, 3]    -> [2.75, 4.75]
    ups = [up(0, [1, 0], 1), up(1, [3, 0], 3), up(2, [0, 2], 1), up(3, [0, 4], 1)]
    new, notes = aggregate(server, state, ups, 3)
    assert new["model"]["w"].tolist() == [5.25, 1.75]
    assert new["model.1"]["w"].tolist() == [2.75, 4.75]
    assert notes["event"] == "kept" and notes["moved"] == 0
    assert new[GROUP]["assign"].tolist() == [0, 0, 1, 1, -1]
    assert notes["models"][1] is new["model.1"] and notes["unassigned"] is new[ANCHOR]


def test_a_client_seen_first_after_the_clustering_joins_the_nearest_cluster():
    server, state, _ = clustered("global")
    inst = server.instruction(3, state, CLIENTS[4], 0)
    assert inst.state is state[ANCHOR] and inst.config == {"cluster": -1}  # sent the anchor [1, 1]
    # its update [-0.5, 3]: cos with centre 0 (x) < 0, with centre 1 (y) 0.99 -> cluster 1.
    # Cluster 1's members' adapters: client 2 [2.75, 3.75] (1), client 3 [2.75, 5.75] (1),
    # client 4 [1, 1] + [-0.5, 3] = [0.5, 4] (2): mean (2.75 + 2.75 + 1) / 4 = 1.625,
    # (3.75 + 5.75 + 8) / 4 = 4.375. Cluster 0 had no member: unchanged.
    new, notes = aggregate(server, state, [up(2, [0, 2], 1), up(3, [0, 4], 1), up(4, [-0.5, 3], 2)], 3)
    assert new[GROUP]["assign"].tolist() == [0, 0, 1, 1, 1]
    assert new["model.1"]["w"].tolist() == [1.625, 4.375]
    assert new["model"]["w"].tolist() == [2.75, 1.75]
    assert server.instruction(4, new, CLIENTS[4], 0).state is new["model.1"]


def test_instructions_carry_the_clients_cluster_model():
    server, state, _ = clustered("cluster_mean")
    for cid, group, j in [(0, "model", 0), (1, "model", 0), (2, "model.1", 1), (3, "model.1", 1)]:
        inst = server.instruction(3, state, CLIENTS[cid], 0)
        assert inst.state is state[group] and inst.config == {"cluster": j}
    assert server.instruction(3, state, CLIENTS[2], 0).state["w"].tolist() == [1.0, 2.5]
    before = {"model": {"w": torch.zeros(2)}, **server.init({"w": torch.zeros(2)})}
    assert server.instruction(1, before, CLIENTS[2], 0).state is before["model"]  # warm-up: the global model


def test_every_round_reclusters_and_keeps_the_indices():
    server, state, _ = clustered("cluster_mean", "every_round")  # model [4.5, 1], model.1 [1, 2.5], anchor [1, 1]
    # adapters minus anchor: client 2 [1,2.5]+[0,1]-[1,1] = [0, 2.5]; client 3 [0.5, 1.5];
    # client 0 [4.5,1]+[1,0]-[1,1] = [4.5, 0]; client 1 [4.5,1]+[-3.5,3]-[1,1] = [0, 3] (now with y).
    # k-means in this order: centre 0 = client 2 (y), centre 1 = client 0 (x): fit [0, 0, 1, 0];
    # old clusters [1, 1, 0, 0]: the matching keeping most clients is 0 -> 1, 1 -> 0.
    ups = [up(2, [0, 1], 1), up(3, [0.5, 0], 1), up(0, [1, 0], 1), up(1, [-3.5, 3], 2)]
    new, notes = aggregate(server, state, ups, 3)
    assert new[GROUP]["assign"].tolist() == [0, 1, 1, 1, -1]
    assert notes["event"] == "reclustered" and notes["moved"] == 1
    # cluster 0: client 0 alone: [4.5, 1] + [1, 0] = [5.5, 1]
    # cluster 1: adapters [1, 3.5] (1), [1.5, 2.5] (1), client 1's [1, 4] (2): [4.5, 14] / 4 = [1.125, 3.5]
    assert new["model"]["w"].tolist() == [5.5, 1.0]
    assert new["model.1"]["w"].tolist() == [1.125, 3.5]
    assert torch.allclose(new[GROUP]["centres"][0], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert align_labels([0, 0, 1, 0], [1, 1, 0, 0], 2) == [1, 0]


def test_learner_trains_the_state_it_is_sent_and_reports_its_cluster(tmp_path, tiny):
    wb = Workbench(from_dict(tiny, overrides=["train.steps=1"]))
    sent = {k: v + 0.25 for k, v in wb.initial_state().items()}
    update = UpdateClustersLearner().local_update(Instruction(round=3, cid=0, state=sent, config={"cluster": 1}), wb.context(0, 3))
    assert update.meta["cluster"] == "1" and update.metrics["cluster"] == 1.0
    trained = get_state(wb.model)
    assert all(torch.allclose(sent[k] + update.payload[k], trained[k], atol=1e-6) for k in sent)


def run_config(tmp_path, rounds: int) -> dict:
    raw = tiny_config(tmp_path, rounds=rounds)
    raw["federation"].update(clients=4, client_holdout=0.2)
    raw["train"]["steps"] = 1
    raw["learner"] = {"name": "update_clusters", "k": 2, "warmup_rounds": 1}
    raw["server_steps"] = [{"name": "cluster_report", "source": "server", "client_eval": "all", "truth_column": "label"}]
    return raw


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uc")
    rt = LocalRuntime(from_dict(run_config(tmp, 3)), tmp / "full")
    rt.run()
    return tmp, rt


def rows_of(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_reports_and_evaluates_each_client_with_its_cluster_model(full):
    tmp, rt = full
    rows = rows_of(tmp / "full")
    assert [r["cluster_report.event"] for r in rows[1:]] == ["clustered", "kept", "kept"]
    assign = rows[3]["cluster_report.assign"]
    assert sorted(set(assign)) == [0, 1] and rows[3]["cluster_report.sizes"] == [assign.count(0), assign.count(1)]
    assert 0.5 <= rows[3]["cluster_report.purity"] <= 1.0
    ck = Checkpointer(tmp / "full", 1).load_latest()
    assert ck.algorithm[f"{GROUP}/assign"].tolist() == assign
    # recompute the per-client accuracy from the checkpointed cluster models
    models = {0: ck.state, 1: {k[len("model.1/"):]: v for k, v in ck.algorithm.items() if k.startswith("model.1/")}}
    accs = client_accuracies(rt.wb, lambda c: models[assign[c]], range(4))
    got = summary(accs)
    assert rows[3]["cluster_report.client_accuracy_mean"] == pytest.approx(got["client_accuracy_mean"])
    assert rows[3]["cluster_report.client_accuracy_worst10"] == pytest.approx(got["client_accuracy_worst10"])
    assert rows[3]["cluster_report.client_evaluated"] == 4
    # the downlink carries one model per client, not K
    n = sum(t.numel() for t in rt.wb.initial_state().values())
    assert 4 * n * 4 <= rows[3]["bytes_down"] < 2 * 4 * n * 4


def test_resume_gives_identical_results(full):
    tmp, rt = full
    LocalRuntime(from_dict(run_config(tmp, 2)), tmp / "part").run()
    part = LocalRuntime(from_dict(run_config(tmp, 3)), tmp / "part", resume=True)
    part.run()
    for k, v in rt.final_state.items():
        assert torch.equal(v, part.final_state[k]), k
    a, b = Checkpointer(tmp / "full", 1).load_latest(), Checkpointer(tmp / "part", 1).load_latest()
    assert a.algorithm.keys() == b.algorithm.keys()
    assert all(torch.equal(a.algorithm[k], b.algorithm[k]) for k in a.algorithm)
    keys = [k for k in rows_of(tmp / "full")[3] if k.startswith("cluster_report.")]
    assert [rows_of(tmp / "full")[3][k] for k in keys] == [rows_of(tmp / "part")[3][k] for k in keys]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"learner.k": 5}, r"k=5 clusters but only 4 clients"),
        ({"federation.clients_per_round": 2, "learner.k": 3}, r"k=3 clusters but 2 clients per round"),
        ({"learner.warmup_rounds": 3}, r"warmup_rounds=3 .* rounds=3"),
        ({"eval.clients": "all"}, r"eval.clients 'all'"),
        ({"server_steps": []}, r"add server_steps"),
        ({"aggregator": {"rule": "median"}}, r"update_clusters: aggregates each cluster"),
        ({"server_optimizer": {"name": "sgd", "lr": 0.5}}, r"sgd with lr 1"),
        ({"peft.local": ["*classifier*"]}, r"local part"),
        ({"server_steps": [{"name": "cluster_report", "source": "server"}, {"name": "weak_dp", "std": 0.1}]},
         r"'weak_dp' works on the delta of cluster 0 only"),
    ],
)
def test_refused_combinations(tmp_path, change, match):
    raw = run_config(tmp_path, 3)
    for key, value in change.items():
        node = raw
        *head, last = key.split(".")
        for p in head:
            node = node.setdefault(p, {})
        node[last] = value
    with pytest.raises(ConfigError, match=match):
        from_dict(raw)


def test_report_from_the_server_needs_the_learner(tmp_path):
    raw = run_config(tmp_path, 3)
    del raw["learner"]
    with pytest.raises(ConfigError, match="source: server reads the clusters of learner update_clusters"):
        from_dict(raw)
    raw["server_steps"] = [{"name": "cluster_report", "source": "meta", "client_eval": "all"}]
    with pytest.raises(ConfigError, match="client_eval 'all' needs source: server"):
        from_dict(raw)


def test_every_round_with_fewer_updates_than_k_keeps_the_clusters():
    server, state, _ = clustered("cluster_mean", "every_round")
    # one update (client 4, new, sent the anchor [1, 1]) < k = 2: no k-means; it joins the
    # nearest centre: [3, 0.5] is closest to x (cluster 0). Cluster 0's only member this round:
    # [4.5, 1] + ([1, 1] + [3, 0.5] - [4.5, 1]) = [4, 1.5], its adapter.
    new, notes = aggregate(server, state, [up(4, [3, 0.5], 1)], 3)
    assert notes["event"] == "kept" and new[GROUP]["assign"].tolist() == [0, 0, 1, 1, 0]
    assert new["model"]["w"].tolist() == [4.0, 1.5] and new["model.1"]["w"].tolist() == [1.0, 2.5]
