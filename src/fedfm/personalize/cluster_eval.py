"""Per-client accuracy with each client's own cluster model (IFCA, given clusters).

The round loop's per-client evaluation (``eval.clients``) sends every client the State of
cluster 0 (``model``); until the algorithm can name a State per client for evaluation
(docs/adaptability.md), this evaluates each client's held-out slice
(``federation.client_holdout``) with the model of its cluster, from the run's final server
state: the assignment kept by ``cluster_report``, or, for a client never assigned, the
lowest-loss model on its training examples (IFCA's own choice). A client's local part
(``peft.local``) comes from its store, as in the loop's evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfm.core.types import ServerState
from fedfm.personalize.clustering import ifca_choice
from fedfm.personalize.ifca import group_name
from fedfm.runtime.client import LOCAL_KEY


def worst_decile(values: list[float]) -> float:
    k = max(1, -(-len(values) // 10))
    return float(np.mean(sorted(values)[:k]))


def cluster_client_eval(wb, server_state: ServerState, k: int, assign: list[int] | None = None, store=None) -> dict[str, Any]:
    accs: dict[int, float] = {}
    for c in wb.clients:
        items = wb.eval_examples(c.cid)
        if not items:
            continue
        local = store.get(c.cid, LOCAL_KEY) if store is not None else None
        local = local or {}
        models = [{**server_state[group_name(j)], **local} for j in range(k)]
        j = assign[c.cid] if assign is not None and assign[c.cid] >= 0 else -1
        if j < 0:
            train = wb.batches(wb.examples(c.cid)[:64])
            j = ifca_choice([wb.evaluate(m, train)["loss"] for m in models])
        accs[c.cid] = wb.evaluate(models[j], wb.batches(items))["accuracy"]
    values = list(accs.values())
    return {"client_accuracy_mean": float(np.mean(values)), "client_accuracy_worst10": worst_decile(values), "per_client": accs}
