"""What crosses the wire, shared by every backend so that bytes are identical on all.

Downlink: the State plus any tensors the algorithm broadcasts beside it (SCAFFOLD's
server control variate, in ``Instruction.config[key]``) travel as one payload, entries
``key/name``, so they are compressed and counted like the State. Uplink: the update with
metadata naming the client, its example count, its base-model fingerprint and its
scalar metrics.
"""

from __future__ import annotations

from typing import Any

import torch

from fedfm.core.types import Instruction, State, Update


def broadcast_layout(config: dict[str, Any]) -> dict[str, list[str]]:
    """``{key: [names]}`` of the tensor groups in an instruction's config."""
    return {
        key: list(value)
        for key, value in config.items()
        if isinstance(value, dict) and value and all(torch.is_tensor(t) for t in value.values())
    }


def broadcast_payload(inst: Instruction) -> State:
    """The State plus the config's tensor groups, flattened as ``key/name``."""
    extras = {f"{key}/{n}": inst.config[key][n] for key, names in broadcast_layout(inst.config).items() for n in names}
    return {**inst.state, **extras}


def broadcast_reference(template: State, layout: dict[str, list[str]]) -> State:
    """Decoder reference for a broadcast: the State's template plus each group's entries,
    which have the shapes of the State entries of the same name."""
    ref = dict(template)
    for key, names in layout.items():
        for n in names:
            if n not in template:
                raise ValueError(f"broadcast group '{key}' has entry '{n}' that is not in the State")
            ref[f"{key}/{n}"] = template[n]
    return ref


def split_broadcast(received: State, template: State, config: dict[str, Any], layout: dict[str, list[str]]) -> tuple[State, dict[str, Any]]:
    """Inverse of ``broadcast_payload``: (State, config with its tensor groups restored)."""
    state = {k: received[k] for k in template}
    config = dict(config)
    for key, names in layout.items():
        config[key] = {n: received[f"{key}/{n}"] for n in names}
    return state, config


def update_meta(cid: int, update: Update, fingerprint: str) -> dict[str, str]:
    meta = {"cid": str(cid), "num_examples": str(update.num_examples), "fingerprint": fingerprint, **update.meta}
    for k, v in update.metrics.items():
        if isinstance(v, (int, float)):
            meta[f"metric.{k}"] = repr(float(v))
    return meta


def metrics_from_meta(meta: dict[str, str]) -> dict[str, float]:
    return {k[len("metric."):]: float(v) for k, v in meta.items() if k.startswith("metric.")}
