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

With ``source: updates`` the clusters are found and reported, but serving each cluster its
own model after the warm-up needs the server to send different models to different
clients, which ``runtime/algorithm.py`` cannot yet do (docs/adaptability.md gives the
change); meanwhile the found assignment can seed ``ifca`` with ``assign: profile``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.protocols import RoundContext
from fedfm.core.types import State, Update
from fedfm.personalize.clustering import cluster_updates, purity
from fedfm.personalize.ifca import META, clusters_from_column


class ClusterReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["meta", "updates"] = Field("meta", description="meta: the clients' own choice; updates: cluster the updates")
    k: int = Field(2, ge=1, description="clusters to find (source: updates)")
    warmup: int = Field(1, ge=1, description="first round whose updates may be clustered (source: updates)")
    truth_column: str | None = Field(None, description="data column giving each client's known group (majority)")
    truth_profile: str | None = Field(None, description="profile key giving each client's known group")

    @model_validator(mode="after")
    def _one_truth(self):
        if self.truth_column is not None and self.truth_profile is not None:
            raise ValueError("give at most one of truth_column and truth_profile")
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

    def __init__(self, params: ClusterReportParams):
        self.p = params
        self._truth: dict[int, object] | None = None

    def __call__(self, updates: list[Update], ctx: RoundContext, state: State):
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
        metrics: dict[str, object] = {
            "assigned": int((assign >= 0).sum()),
            "sizes": [int((assign == j).sum()) for j in range(int(assign.max()) + 1)] if int(assign.max()) >= 0 else [],
            "assign": assign.tolist(),
        }
        if self._truth is None:
            self._truth = known_groups(ctx, self.p)
        assigned = {c: int(assign[c]) for c in range(len(assign)) if int(assign[c]) >= 0}
        if self._truth is not None and any(c in self._truth for c in assigned):
            metrics["purity"] = purity(assigned, self._truth)
        return updates, {"assign": assign, "done": done}, metrics


register_server_step("cluster_report", ClusterReport, ClusterReportParams)
