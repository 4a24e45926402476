"""Clustering of the clients by the similarity of their (LoRA) updates after a warm-up,
then one model per cluster: ``learner: {name: update_clusters, k, warmup_rounds,
recluster, start}``.

After FL-TAC (Ping, Mao, Liu, Zhang and Ding 2024, "FL-TAC: Enhanced Fine-Tuning in
Federated Learning via Low-Rank, Task-Specific Adapter Clustering", ICLR 2024 Workshop on
LLM Agents). What matches FL-TAC: the server clusters the adapters it receives with
k-means into K clusters, without any label from the clients, and averages each cluster's
adapters over its own members only (example-weighted FedAvg), giving K task-specific
adapters; with ``recluster: every_round`` it re-runs the k-means every round on the
adapters the clients return, as the authors' training loop does, and ``start: cluster_mean``
makes each cluster's first model the FedAvg of its members' adapters of the clustering
round, as in FL-TAC. What is FL-TAC-inspired only:

- FL-TAC gives a client one adapter per *local task* (a client of several tasks trains
  several adapters); here a client holds one adapter (its data is one task or group), so
  the adapters clustered are the clients';
- the k-means is spherical (cosine similarity, ``clustering.spherical_kmeans_fit``, with a
  deterministic farthest-point start) on the client's adapter minus the *anchor* (the
  global model the clustering round started from); FL-TAC runs Euclidean k-means
  (scikit-learn, 10 random restarts) on the adapters themselves;
- FL-TAC clusters from round 1; here rounds ``1 .. warmup_rounds`` train one global model
  (plain FedAvg) and the updates of round ``warmup_rounds`` are the first clustered (all
  from the same global model, so they are comparable), and by default (``recluster:
  never``) the clusters found then are kept;
- cluster indices stay stable across re-clusterings (new clusters are matched to old
  indices keeping the most clients in place, ``clustering.align_labels``), so a client
  that skips a round keeps its cluster; FL-TAC's clients all take part in every round, so
  the rule for a client first seen after the clustering (below) is this framework's.

Checked against the authors' code (``fltac/server.py``: scikit-learn ``KMeans`` with K =
the number of tasks and ``n_init=10`` on the flattened adapters, then a sample-weighted
average per cluster; ``fltac/trainer.py``: both every round from round 1). The k-means
and the label matching are ``personalize/clustering.py``'s (written by hand there, see its
docstring); the rest is this framework's round: which State each client is sent and how
each cluster's model moves.

Server state: cluster 0's model is ``model`` (what the global evaluation, ``final
.safetensors`` and ``fedfm report`` see), cluster j >= 1 is the group ``model.<j>``
(``ifca.group_name``, the same layout as IFCA); ``update_clusters`` holds ``assign`` (one
int64 per client, -1 = no cluster yet), ``clustered`` (the round of the first clustering,
0 before) and ``centres`` (K x d unit k-means centres); ``update_clusters.anchor`` the
anchor. All of it is checkpointed, so a resumed run continues with the same clusters.

A round (``combine_updates``; the server part's per-client ``instruction`` hook of
``runtime/algorithm.py``, so each client receives ONE model, its cluster's, not K):

- warm-up (no clustering yet): every client is sent ``model``; the round's updates are
  averaged as FedAvg. In round ``warmup_rounds`` (or the first later round with at least
  K updates) the updates are clustered; the K models are then initialised from the
  global model after this round's FedAvg (``start: global``) or each from the anchor plus
  its members' FedAvg (``start: cluster_mean``).
- clustered: a client with a cluster is sent its cluster's model; a client that has none
  (it never sent an update before the clustering: partial participation) is sent the
  anchor and, with ``recluster: never``, joins the cluster whose centre is nearest (cosine)
  to its first update (``anchor + delta - anchor``); with ``every_round`` the round's
  adapters (``sent + delta - anchor``) are clustered afresh and every participant takes its
  new cluster (a round with fewer than K updates keeps the clusters, newcomers nearest).
  Cluster c then moves to ``model_c + fedavg_i(sent_i + delta_i - model_c)`` over the
  round's members i of c (weights: examples), i.e. the weighted mean of its members'
  adapters; a member sent ``model_c`` contributes exactly its delta, so with ``recluster:
  never`` and no newcomer this is ``model_c`` + the weighted mean of its members' updates.
  A cluster without a member this round keeps its model.

The client side is the plain local loop (``learners/local.py``) on the State it is sent;
the cluster index it was sent travels in ``Instruction.config["cluster"]`` (-1: the
global model or the anchor) and back in the update's metadata and metrics (``cluster``).

Reporting and per-client evaluation: the server part leaves the round's clusters in
``RoundContext.notes["clusters"]``; the server step ``cluster_report`` with ``source:
server`` (required, checked at config time) reports them every round and, with
``client_eval: all``, evaluates each client's held-out slice with its own cluster's model
(``cluster_report.client_accuracy_mean`` / ``_worst10``). The loop's own ``eval.clients``
would send cluster 0 to every client and is refused.

Refused at config time (``update_clusters_config_problems``): a rule other than
``fedavg`` or a server optimizer other than ``sgd`` lr 1 (cluster 0 goes through the
optimizer, the others not); ``k`` above the clients or the clients per round;
``warmup_rounds >= rounds``; ``client_eval`` with ``peft.local`` or the Flower backend;
server steps at stage ``delta`` (they would change
cluster 0 only) or with per-client States (``client_state``: the per-cluster instruction replaces
them); ``eval.clients`` other than ``none``; a missing ``cluster_report`` with ``source:
server``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec, Instruction, ServerState, State, Update
from fedfm.learners.base import register_learner
from fedfm.learners.local import LocalLearner
from fedfm.personalize.cluster_report import NOTES
from fedfm.personalize.clustering import align_labels, flatten, nearest_centre, spherical_kmeans_fit
from fedfm.personalize.ifca import group_name

GROUP = "update_clusters"
ANCHOR = "update_clusters.anchor"
META = "cluster"


class UpdateClustersParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(2, ge=1, description="number of clusters (models) K")
    warmup_rounds: int = Field(1, ge=1, description="rounds 1..W train one global model; the updates of round W are clustered")
    recluster: Literal["never", "every_round"] = Field(
        "never", description="never: keep the clusters of the first clustering; every_round: k-means on every round's adapters (FL-TAC)")
    start: Literal["global", "cluster_mean"] = Field(
        "global", description="first cluster models: the global model after the clustering round, or the FedAvg of each cluster's members (FL-TAC)")


class UpdateClustersLearner(LocalLearner):
    """Plain local training on the State sent (its cluster's model); reports the cluster."""

    def local_update(self, instruction: Instruction, ctx) -> Update:
        update = super().local_update(instruction, ctx)
        j = int(instruction.config.get(META, -1))
        update.meta = {**update.meta, META: str(j)}
        update.metrics = {**update.metrics, META: float(j)}
        return update


def served(server_state: ServerState, cid: int) -> tuple[int, State]:
    """(cluster index, State) client ``cid`` is sent: ``model`` before the clustering (-1);
    then its cluster's model, or the anchor (-1) for a client without a cluster."""
    st = server_state[GROUP]
    if int(st["clustered"][0]) == 0:
        return -1, server_state[MODEL]
    j = int(st["assign"][cid])
    return (j, server_state[group_name(j)]) if j >= 0 else (-1, server_state[ANCHOR])


def vector(sent: State, delta: State, anchor: State, names: Sequence[str]) -> torch.Tensor:
    """The client's adapter minus the anchor, ``sent + delta - anchor``, flat (float64)."""
    return torch.cat([(sent[n].double() + delta[n].double() - anchor[n].double()).reshape(-1) for n in names])


def move(model: State, members: Sequence[tuple[State, State, float]], rule, rule_params) -> State:
    """The rule's combination of the members' adapters relative to ``model``:
    ``rule(model, [sent_i + delta_i - model], weights)`` (``sent_i is model`` -> exactly delta_i)."""
    shifts = [delta if sent is model else {n: sent[n] - model[n] + delta[n] for n in model} for sent, delta, _ in members]
    return rule(model, shifts, [w for _, _, w in members], rule_params)


class UpdateClustersServer(ServerPartBase):
    def __init__(self, params: UpdateClustersParams, num_clients: int):
        self.p = params
        self.num_clients = num_clients

    # -- state and what each client receives ---------------------------------------------

    def init(self, model: State) -> ServerState:
        d = sum(t.numel() for t in model.values())
        out: ServerState = {group_name(j): {n: t.clone() for n, t in model.items()} for j in range(1, self.p.k)}
        out[ANCHOR] = {n: t.clone() for n, t in model.items()}
        out[GROUP] = {
            "assign": torch.full((self.num_clients,), -1, dtype=torch.int64),
            "clustered": torch.zeros(1, dtype=torch.int64),
            "centres": torch.zeros(self.p.k, d, dtype=torch.float64),
        }
        return out

    def instruction(self, rnd: int, server_state: ServerState, client: ClientSpec, seed: int) -> Instruction:
        j, state = served(server_state, client.cid)
        return Instruction(round=rnd, cid=client.cid, state=state, config={META: j})

    def client_reference(self, cid: int, profile: dict, shared: State, config: dict | None = None) -> State:
        return shared  # every cluster's model has the global State's names and shapes

    def client_payload_spec(self, instruction: Instruction, shared: State) -> State:
        return shared

    # -- aggregation -----------------------------------------------------------------------

    def combine_updates(self, server_state: ServerState, updates: Sequence[Update], rule, rule_params, ctx: RoundContext):
        st = server_state[GROUP]
        assign, centres = st["assign"].clone(), st["centres"].clone()
        clustered = int(st["clustered"][0])
        model = server_state[MODEL]
        names = sorted(model)
        weights = [float(u.num_examples) for u in updates]
        for u in updates:
            if not 0 <= u.cid < self.num_clients:
                raise ValueError(f"update_clusters: update from client {u.cid}, outside 0..{self.num_clients - 1}")
        groups: ServerState = {}
        if not clustered:
            delta = rule(model, [u.payload for u in updates], weights, rule_params)
            event = "warmup"
            if ctx.round >= self.p.warmup_rounds and len(updates) >= self.p.k:
                x = torch.stack([flatten(u.payload, names) for u in updates])  # sent = anchor = model
                labels, centres = spherical_kmeans_fit(x, self.p.k)
                for u, lab in zip(updates, labels):
                    assign[u.cid] = lab
                groups[ANCHOR] = dict(model)
                clustered, event = ctx.round, "clustered"
                for j in range(self.p.k):
                    members = [(model, u.payload, w) for u, w, lab in zip(updates, weights, labels) if lab == j]
                    d_j = move(model, members, rule, rule_params) if self.p.start == "cluster_mean" and members else delta
                    if j == 0:
                        delta = d_j
                    else:
                        groups[group_name(j)] = {n: model[n] + d_j[n] for n in model}
        else:
            anchor = server_state[ANCHOR]
            sent = [served(server_state, u.cid)[1] for u in updates]
            x = torch.stack([vector(s, u.payload, anchor, names) for s, u in zip(sent, updates)])
            before = [int(assign[u.cid]) for u in updates]
            if self.p.recluster == "every_round" and len(updates) >= self.p.k:
                fit, fresh = spherical_kmeans_fit(x, self.p.k)
                perm = align_labels(fit, before, self.p.k)
                labels = [perm[lab] for lab in fit]
                centres = torch.zeros_like(fresh)
                for new, old in enumerate(perm):
                    centres[old] = fresh[new]
                event = "reclustered"
            else:
                labels = [b if b >= 0 else nearest_centre(v, centres) for b, v in zip(before, x)]
                event = "kept"
            for u, lab in zip(updates, labels):
                assign[u.cid] = lab
            delta = {n: torch.zeros_like(t) for n, t in model.items()}
            for j in range(self.p.k):
                current = server_state[group_name(j)]
                members = [(s, u.payload, w) for s, u, w, lab in zip(sent, updates, weights, labels) if lab == j]
                if not members:
                    continue
                d_j = move(current, members, rule, rule_params)
                if j == 0:
                    delta = d_j
                else:
                    groups[group_name(j)] = {n: current[n] + d_j[n] for n in current}
        groups[GROUP] = {"assign": assign, "clustered": torch.tensor([clustered], dtype=torch.int64), "centres": centres}
        ctx.notes[NOTES] = {
            "k": self.p.k,
            "assign": assign.clone(),
            "clustered": clustered,
            "event": event,
            "models": {j: groups.get(group_name(j), server_state[group_name(j)]) for j in range(1, self.p.k)},
            "unassigned": None if not clustered else groups.get(ANCHOR, server_state[ANCHOR]),
            "moved": sum(1 for u in updates if int(st["assign"][u.cid]) >= 0 and int(assign[u.cid]) != int(st["assign"][u.cid])),
        }
        return groups, delta


def update_clusters_config_problems(exp) -> list[str]:
    from fedfm.aggregators.pipeline import build_step
    from fedfm.personalize.checks import plain_mean_problem
    from fedfm.runtime.sampling import clients_per_round

    reporting = [s for s in exp.server_steps if s.get("name") == "cluster_report" and s.get("source") == "server"]
    if exp.learner.name != "update_clusters":
        if reporting:
            return ["server_steps cluster_report with source: server reads the clusters of learner update_clusters; "
                    f"learner.name is '{exp.learner.name}'"]
        return []
    try:
        p = UpdateClustersParams(**exp.learner.params())
    except ValueError:
        return []  # the learner's own parameter check reports it
    found: list[str] = []
    plain = plain_mean_problem(exp, "update_clusters")
    if plain is not None:
        found.append(plain)
    n = exp.federation.clients
    per_round = clients_per_round(exp.federation, n)
    if p.k > n:
        found.append(f"learner update_clusters: k={p.k} clusters but only {n} clients (federation.clients)")
    elif p.k > per_round:
        found.append(f"learner update_clusters: k={p.k} clusters but {per_round} clients per round; "
                     "the clustering needs at least k updates in one round")
    if p.warmup_rounds >= exp.rounds:
        found.append(f"learner update_clusters: warmup_rounds={p.warmup_rounds} leaves no round with per-cluster models "
                     f"in rounds={exp.rounds} (needs warmup_rounds < rounds)")
    if exp.eval.clients != "none":
        found.append(f"learner update_clusters: eval.clients '{exp.eval.clients}' would evaluate every client with "
                     "cluster 0's model; use server_steps cluster_report (source: server, client_eval: all)")
    if any(s.get("client_eval", "none") != "none" for s in reporting):
        if exp.peft.local:
            found.append("server_steps cluster_report: client_eval evaluates on the server, which holds no client's "
                         f"local part (peft.local {list(exp.peft.local)}); set client_eval: none")
        if exp.runtime.backend != "local":
            found.append(f"server_steps cluster_report: client_eval reads the clients' held-out slices on the server; "
                         f"runtime.backend '{exp.runtime.backend}' keeps them on the clients (use the local backend)")
    if not reporting:
        found.append("learner update_clusters: add server_steps: [{name: cluster_report, source: server}] "
                     "(it reports the clusters every round and evaluates each client with its cluster's model)")
    for i, spec in enumerate(exp.server_steps):
        try:
            step = build_step(spec, f"server_steps[{i}]")
        except (ValueError, KeyError):
            continue  # the server step's own check reports it
        if step.stage == "delta":
            found.append(f"learner update_clusters: server_steps[{i}] '{step.name}' works on the delta of cluster 0 only")
        if step.client_state is not None:
            found.append(f"learner update_clusters: server_steps[{i}] '{step.name}' sends per-client States, "
                         "which the per-cluster instructions replace")
    return found


register_learner("update_clusters", UpdateClustersLearner, UpdateClustersParams)
register_server_part("update_clusters", UpdateClustersServer)

__all__ = ["UpdateClustersParams", "UpdateClustersServer", "served", "update_clusters_config_problems"]
