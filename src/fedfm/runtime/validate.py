"""Server-side validation of client updates before aggregation.

Plain functions: each returns ``None`` when the check passes or a short reason naming the
tensor or the field. ``check_update`` runs them all. A rejected update is logged with its
reason and client id and never reaches the aggregator, so the server State cannot be
corrupted by a NaN, a tensor of the wrong name or shape, an oversized payload, or a client
holding a different base model (its fingerprint, ``core.state.fingerprint``, differs).
"""

from __future__ import annotations

import torch

from fedfm.core.types import State


def check_size(nbytes: int, limit: int | None) -> str | None:
    """An encoded update larger than ``limit`` bytes (checked before decoding it)."""
    if limit is not None and nbytes > limit:
        return f"oversized: {nbytes} bytes > max_update_bytes {limit}"
    return None


def check_names_shapes(payload: State, reference: State) -> str | None:
    """Names and shapes must match the payload template of the State exactly."""
    missing = sorted(set(reference) - set(payload))
    extra = sorted(set(payload) - set(reference))
    if missing or extra:
        return f"names do not match the State: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, t in payload.items():
        if tuple(t.shape) != tuple(reference[name].shape):
            return f"shape of '{name}' is {tuple(t.shape)}, expected {tuple(reference[name].shape)}"
    return None


def check_finite(payload: State) -> str | None:
    """No NaN or Inf anywhere; names the first offending tensor."""
    for name, t in payload.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "nan" if bool(torch.isnan(t).any()) else "inf"
            return f"{kind} in '{name}'"
    return None


def check_fingerprint(meta: dict[str, str], expected: str | None) -> str | None:
    """The client's base-model fingerprint must equal the server's."""
    if expected is None:
        return None
    got = meta.get("fingerprint")
    if got is None:
        return "no base-model fingerprint in the update metadata"
    if got != expected:
        return f"base-model fingerprint {got} differs from the server's {expected}"
    return None


def check_weight(meta: dict[str, str]) -> str | None:
    """``num_examples`` must be a positive integer (it weights the aggregate)."""
    raw = meta.get("num_examples")
    try:
        n = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"num_examples '{raw}' is not an integer"
    if n <= 0:
        return f"num_examples {n} is not positive"
    return None


def check_update(payload: State, meta: dict[str, str], reference: State, fingerprint: str | None) -> str | None:
    """Every check after decoding, cheapest first; the first failure's reason, or None."""
    for reason in (
        check_fingerprint(meta, fingerprint),
        check_weight(meta),
        check_names_shapes(payload, reference),
    ):
        if reason is not None:
            return reason
    return check_finite(payload)
