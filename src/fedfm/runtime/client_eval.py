"""Per-client evaluation (``eval.clients``): the clients evaluate the global model on their
own held-out slices through the transport, and the server keeps the replies that decode
to finite metrics (a garbled or NaN reply is logged and left out, never the end of the run).
The row gets ``client_accuracy_mean`` / ``_worst10`` (mean of the lowest tenth),
``client_evaluated``, ``client_loss_mean`` and, for the classification tasks,
``client_balanced_accuracy_mean`` / ``_worst10``: per-label recall averaged over the labels
in each client's slice, so a model that answers every client its majority label scores
1 / (labels present) there, not its label share (tasks/class_tally.py).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from fedfm.codecs import CodecError
from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import from_bytes, to_bytes
from fedfm.core.protocols import EVALUATE, Envelope, Transport
from fedfm.core.types import State

log = logging.getLogger("fedfm.runtime")


def worst_decile(values: list[float]) -> float:
    """Mean of the lowest tenth of ``values`` (at least one value)."""
    k = max(1, math.ceil(len(values) / 10))
    return float(np.mean(sorted(values)[:k]))


def clients_summary(acc: list[float], balanced: list[float]) -> dict[str, Any]:
    """The row's per-client columns: mean, worst decile and count of the accuracies, and
    mean and worst decile of the balanced accuracies (each set only when it has values)."""
    out: dict[str, Any] = {}
    if acc:
        out.update(client_accuracy_mean=float(np.mean(acc)), client_accuracy_worst10=worst_decile(acc), client_evaluated=len(acc))
    if balanced:
        out.update(client_balanced_accuracy_mean=float(np.mean(balanced)), client_balanced_accuracy_worst10=worst_decile(balanced))
    return out


def eval_reply_metrics(data: bytes) -> tuple[dict[str, float], str | None]:
    """(accuracy / balanced accuracy / loss of a client's evaluation reply, None) or ({}, why it is left out):
    undecodable bytes, or a value that is not a finite number."""
    try:
        meta = from_bytes(data).meta
    except CodecError as exc:
        return {}, f"undecodable reply: {exc}"
    out = {}
    for name in ("accuracy", "balanced_accuracy", "loss"):
        raw = meta.get(f"metric.{name}")
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            return {}, f"metric.{name} {raw!r} is not a number"
        if not math.isfinite(value):
            return {}, f"metric.{name} is {value}"
        out[name] = value
    return out, None


def evaluate_on_clients(transport: Transport, wb, mode: str, rnd: int, model_state: State, sampled: list[int],
                        outcomes: dict[int, tuple[str, bool]]) -> dict[str, Any]:
    """``eval.clients``: the round's sampled clients (or all) evaluate the model on their own
    held-out slices, each with its accepted local state of this round (``view``); the
    metrics of the replies that decode to finite numbers."""
    cids = [c.cid for c in wb.clients] if mode == "all" else list(sampled)
    cids = [c for c in cids if wb.clients[c].eval_indices]
    data = to_bytes(Payload(dict(model_state), {"round": str(rnd)}))
    envelopes = []
    for cid in cids:
        outcome = outcomes.get(cid)
        view = outcome[0] if outcome is not None and outcome[1] else ""
        conf = {"round": rnd, "cid": cid, "fingerprint": wb.fingerprint, "view": view}
        envelopes.append(Envelope(cid, EVALUATE, conf, data))
    replies = transport.exchange(envelopes)
    acc, balanced, loss, up = [], [], [], 0
    for e in envelopes:
        reply = replies.get(e.cid)
        if reply is None or reply.error is not None:
            log.warning("round %d: client %d could not evaluate: %s", rnd, e.cid, None if reply is None else reply.error)
            continue
        up += len(reply.data)
        metrics, problem = eval_reply_metrics(reply.data)
        if problem is not None:
            log.warning("round %d: evaluation reply of client %d left out: %s", rnd, e.cid, problem)
            continue
        if "accuracy" in metrics:
            acc.append(metrics["accuracy"])
        if "balanced_accuracy" in metrics:
            balanced.append(metrics["balanced_accuracy"])
        if "loss" in metrics:
            loss.append(metrics["loss"])
    out: dict[str, Any] = {"client_eval_bytes_down": len(data) * len(envelopes), "client_eval_bytes_up": up}
    out.update(clients_summary(acc, balanced))
    if loss:
        out["client_loss_mean"] = float(np.mean(loss))
    return out

