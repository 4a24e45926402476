"""What crosses the wire, shared by every transport so that bytes are identical on all.

Downlink: the shared State plus the tensor groups the algorithm broadcasts beside it
(``Instruction.broadcast``, e.g. SCAFFOLD's ``scaffold_c``) travel as one payload with
entries ``<group>/<name>``, so they are compressed and counted like the State. Uplink:
the update with metadata naming the client, its example count, its base-model
fingerprint and its scalar metrics. The plain settings of a message (round, client, tag,
the store decision) travel beside the bytes (``Envelope.conf``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from fedfm.core.types import Instruction, State, Update


def broadcast_payload(inst: Instruction) -> State:
    """The State plus the broadcast groups, flattened as ``<group>/<name>``."""
    extras = {f"{group}/{n}": t for group, tensors in inst.broadcast.items() for n, t in tensors.items()}
    return {**inst.state, **extras}


def split_broadcast(received: State) -> tuple[State, dict[str, State]]:
    """Inverse of ``broadcast_payload``: (State, broadcast groups)."""
    state: State = {}
    groups: dict[str, State] = {}
    for key, t in received.items():
        if "/" in key:
            group, name = key.split("/", 1)
            groups.setdefault(group, {})[name] = t
        else:
            state[key] = t
    return state, groups


SECONDS = "_s"  # a metric named ``*_s`` is seconds the client measured (``step_s``)


def metric_text(name: str, value: float) -> str:
    """A metric as it travels: exact (``repr``), except measured seconds (``*_s``), which
    travel at a fixed width of 7 significant digits, so that an update's bytes do not
    depend on how many digits the clock gave this time."""
    return format(value, ".6e") if name.endswith(SECONDS) else repr(value)


def update_meta(cid: int, update: Update, fingerprint: str) -> dict[str, str]:
    meta = {"cid": str(cid), "num_examples": str(update.num_examples), "fingerprint": fingerprint, **update.meta}
    for k, v in update.metrics.items():
        if isinstance(v, (int, float)):
            meta[f"metric.{k}"] = metric_text(k, float(v))
    return meta


def metrics_from_meta(meta: dict[str, str]) -> dict[str, float]:
    return {k[len("metric."):]: float(v) for k, v in meta.items() if k.startswith("metric.")}


def metrics_problem(meta: dict[str, str]) -> str | None:
    """Why an update's ``metric.*`` entries cannot be read as finite numbers (they are the
    client's text: a garbled one must reject the update, not stop the round); None when fine."""
    for k, v in meta.items():
        if not k.startswith("metric."):
            continue
        try:
            value = float(v)
        except (TypeError, ValueError):
            return f"{k} {v!r} is not a number"
        if not math.isfinite(value):
            return f"{k} is {value}"
    return None


def encode_settle(outcome: tuple[str, bool] | None) -> str:
    """The server's decision on a client's last staged writes, as message text."""
    return "" if outcome is None else f"{outcome[0]}:{int(outcome[1])}"


def decode_settle(text: str) -> tuple[str | None, bool]:
    if not text:
        return None, False
    tag, flag = text.rsplit(":", 1)
    return tag, flag == "1"


def plain_config(config: dict[str, Any]) -> str:
    """An instruction's plain settings as JSON (tensors travel in the broadcast groups)."""
    try:
        return json.dumps(config, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"Instruction.config must hold plain values (tensors go in Instruction.broadcast): {exc}") from None
