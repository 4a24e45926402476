"""``cluster_report``: keep every client's cluster in the server state and report it,
with its purity against known groups.

A server step at stage ``updates`` (it passes the updates on unchanged). Its state
(server-state group ``step.<i>.cluster_report``, checkpointed, so a resumed run keeps the
assignments) is ``assign``: one int64 per client, -1 until the client is assigned.

- ``source: meta``: the cluster a client chose, from its update's metadata (``cluster``,
  set by the ``ifca`` learner), updated every round the client trains;
- ``source: updates``: clustering of the updates themselves by cosine similarity
  (``clustering.cluster_updates``, FL-TAC-inspired; Ping et al. 2024, "FL-TAC: Enhanced
  Fine-Tuning in Federated Learning via Low-Rank, Task-Specific Adapter Clustering"),
  once, in the first round >= ``warmup`` with at least ``k`` updates; the assignments are
  kept from then on.

Metrics (``cluster_report.<key>`` in metrics.jsonl): ``assigned`` (clients with a cluster),
``sizes`` (clients per cluster), ``assign`` (the cluster of every client, -1 unknown) and,
with ``truth_column`` (each client's majority value of that data column) or
``truth_profile`` (a profile key), ``purity`` (``clustering.purity``).

With ``source: updates`` the clusters are found and reported only: the run keeps one
global model. The learner ``update_clusters`` (``personalize/update_clusters.py``) serves
each cluster its own model after the warm-up; its clusters are reported with

- ``source: server``: the clusters the ``update_clusters`` server part kept this round (it
  leaves them in ``RoundContext.notes["clusters"]``); the step then runs at stage
  ``model`` (after the aggregation, on the new models) and also reports ``event``
  (``warmup``, ``clustered``, ``reclustered``, ``kept``), ``clustered`` (the round of the
  first clustering, 0 before) and ``moved`` (participants whose cluster changed). With
  ``client_eval: all`` it evaluates, in every evaluating round (``eval.every`` and the
  last), each client's held-out slice with the model it is served (its cluster's; the
  global model before the clustering; the anchor for a client without a cluster) on the
  server's workbench (``cluster_eval.client_metrics``; local backend only, no
  ``peft.local``): ``client_accuracy_mean``, ``client_accuracy_worst10``,
  ``client_evaluated`` and, for the classification tasks, ``client_balanced_accuracy_mean``
  and ``_worst10``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.profile_keys import profile_key_field
from fedfm.core.protocols import RoundContext
from fedfm.core.types import State, Update
from fedfm.personalize.cluster_eval import client_metrics, metrics_summary
from fedfm.personalize.clustering import cluster_updates, purity
from fedfm.personalize.ifca import META, clusters_from_column


class ClusterReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["meta", "updates", "server"] = Field(
        "meta", description="meta: the clients' own choice; updates: cluster the updates; server: the clusters of update_clusters")
    k: int = Field(2, ge=1, description="clusters to find (source: updates)")
    warmup: int = Field(1, ge=1, description="first round whose updates may be clustered (source: updates)")
    truth_column: str | None = Field(None, description="data column giving each client's known group (majority)")
    truth_profile: str | None = profile_key_field(None, "profile key giving each client's known group")
    client_eval: Literal["none", "all"] = Field(
        "none", description="all: evaluate each client's held-out slice with its cluster's model (source: server)")

    @model_validator(mode="after")
    def _one_truth(self):
        if self.truth_column is not None and self.truth_profile is not None:
            raise ValueError("give at most one of truth_column and truth_profile")
        if self.client_eval != "none" and self.source != "server":
            raise ValueError(f"client_eval '{self.client_eval}' needs source: server (got source '{self.source}')")
        return self


def known_groups(ctx: RoundContext, params: ClusterReportParams) -> dict[int, object] | None:
    if params.truth_profile is not None:
        return {c.cid: c.profile[params.truth_profile] for c in ctx.clients if params.truth_profile in c.profile}
    if params.truth_column is not None:
        if ctx.workbench is None:
            raise ValueError("cluster_report: truth_column needs the server's workbench")
        return clusters_from_column(ctx.workbench.federation.frame, ctx.clients, params.truth_column)
    return None


def update_vector_names(payload: State) -> list[str]:
    """The model-delta tensors of a payload (group entries such as ``ifca/weight`` left out)."""
    return sorted(k for k in payload if "/" not in k)


class ClusterReport:
    name = "cluster_report"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: ClusterReportParams):
        self.p = params
        self.stage = "model" if params.source == "server" else "updates"
        self._truth: dict[int, object] | None = None

    def __call__(self, value, ctx: RoundContext, state: State):
        if self.p.source == "server":
            return self.served(value, ctx)
        updates: list[Update] = value
        assign = state["assign"].clone() if "assign" in state else torch.full((ctx.num_clients,), -1, dtype=torch.int64)
        done = state.get("done", torch.zeros(1, dtype=torch.int64)).clone()
        if self.p.source == "meta":
            for u in updates:
                if META in u.meta:
                    assign[u.cid] = int(u.meta[META])
        elif not int(done) and ctx.round >= self.p.warmup and len(updates) >= self.p.k:
            labels = cluster_updates([u.payload for u in updates], self.p.k, update_vector_names(updates[0].payload))
            for u, lab in zip(updates, labels):
                assign[u.cid] = lab
            done[0] = 1
        return updates, {"assign": assign, "done": done}, self.report(assign, ctx)

    def report(self, assign: torch.Tensor, ctx: RoundContext, k: int | None = None) -> dict[str, object]:
        top = int(assign.max()) + 1 if k is None else k
        metrics: dict[str, object] = {
            "assigned": int((assign >= 0).sum()),
            "sizes": [int((assign == j).sum()) for j in range(top)] if int(assign.max()) >= 0 else [],
            "assign": assign.tolist(),
        }
        if self._truth is None:
            self._truth = known_groups(ctx, self.p)
        assigned = {c: int(assign[c]) for c in range(len(assign)) if int(assign[c]) >= 0}
        if self._truth is not None and any(c in self._truth for c in assigned):
            metrics["purity"] = purity(assigned, self._truth)
        return metrics

    def served(self, model: State, ctx: RoundContext):
        """``source: server``: report the clusters of this round and evaluate each client
        with its cluster's model (``model`` = cluster 0's new State)."""
        notes = ctx.notes.get(NOTES)
        if notes is None:
            raise ValueError("cluster_report (source: server): no server part left clusters in this round's notes "
                             "(it reads learner update_clusters)")
        assign = notes["assign"]
        metrics = self.report(assign, ctx, notes["k"])
        metrics.update(event=notes["event"], clustered=notes["clustered"], moved=notes["moved"])
        if self.p.client_eval == "all" and evaluating(ctx):

            def state_of(cid: int) -> State:
                j = int(assign[cid])
                if j == 0:
                    return model
                if j > 0:
                    return notes["models"][j]
                return model if notes["unassigned"] is None else notes["unassigned"]

            metrics.update(metrics_summary(client_metrics(ctx.workbench, state_of, [c.cid for c in ctx.clients])))
        return model, {"assign": assign.clone()}, metrics


def evaluating(ctx: RoundContext) -> bool:
    """Whether the loop evaluates this round (``eval.every``, and the last round)."""
    exp = ctx.workbench.exp
    return ctx.round % exp.eval.every == 0 or ctx.round == exp.rounds


NOTES = "clusters"  # the RoundContext.notes key of personalize/update_clusters.py


register_server_step("cluster_report", ClusterReport, ClusterReportParams)
