"""Per-client accuracy with each client's own cluster model (IFCA, given clusters,
update clusters).

The round loop's per-client evaluation (``eval.clients``) sends every client the State of
cluster 0 (``model``). Here each client's held-out slice (``federation.client_holdout``)
is evaluated with the model of its cluster, on the server's workbench (the local backend,
where the server process holds the clients' data):

- ``client_metrics(wb, state_of, cids)``: the task's metrics of each client under the
  State ``state_of(cid)`` returns (``client_accuracies``: the accuracy alone);
  ``summary`` / ``metrics_summary`` give the mean and worst decile as the loop reports
  them, of the balanced accuracy too for the classification tasks. ``cluster_report``
  (``source: server``, ``client_eval: all``) calls them every evaluating round of an
  ``update_clusters`` run;
- ``cluster_client_eval``: after an IFCA run, from its final server state: the assignment
  kept by ``cluster_report``, or, for a client never assigned, the lowest-loss model on
  its training examples (IFCA's own choice). A client's local part (``peft.local``) comes
  from its store, as in the loop's evaluation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from fedfm.core.types import ServerState, State
from fedfm.personalize.clustering import ifca_choice
from fedfm.personalize.ifca import group_name
from fedfm.runtime.client import LOCAL_KEY
from fedfm.runtime.client_eval import clients_summary


def client_metrics(wb, state_of: Callable[[int], State], cids: Iterable[int]) -> dict[int, dict[str, float]]:
    """The task's metrics of each client (with a held-out slice) under ``state_of(cid)``."""
    out: dict[int, dict[str, float]] = {}
    for cid in cids:
        items = wb.eval_examples(cid)
        if items:
            out[cid] = {k: float(v) for k, v in wb.evaluate(state_of(cid), wb.batches(items)).items()}
    return out


def client_accuracies(wb, state_of: Callable[[int], State], cids: Iterable[int]) -> dict[int, float]:
    """Accuracy of each client (with a held-out slice) under ``state_of(cid)``."""
    return {cid: m["accuracy"] for cid, m in client_metrics(wb, state_of, cids).items()}


def summary(accs: dict[int, float]) -> dict[str, Any]:
    """Mean, worst decile and count of the clients' accuracies, as the loop's ``eval.clients``
    reports them."""
    return clients_summary(list(accs.values()), [])


def metrics_summary(per_client: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The same of ``client_metrics``' result, with the balanced accuracy's mean and worst
    decile where the task gives it."""
    return clients_summary([m["accuracy"] for m in per_client.values()],
                           [m["balanced_accuracy"] for m in per_client.values() if "balanced_accuracy" in m])


def cluster_client_eval(wb, server_state: ServerState, k: int, assign: list[int] | None = None, store=None) -> dict[str, Any]:
    def state_of(cid: int) -> State:
        local = store.get(cid, LOCAL_KEY) if store is not None else None
        local = local or {}
        models = [{**server_state[group_name(j)], **local} for j in range(k)]
        j = assign[cid] if assign is not None and assign[cid] >= 0 else -1
        if j < 0:
            train = wb.batches(wb.examples(cid)[:64])
            j = ifca_choice([wb.evaluate(m, train)["loss"] for m in models])
        return models[j]

    per_client = client_metrics(wb, state_of, [c.cid for c in wb.clients])
    out = metrics_summary(per_client)
    out.pop("client_evaluated", None)
    return {**out, "per_client": {c: m["accuracy"] for c, m in per_client.items()}}
