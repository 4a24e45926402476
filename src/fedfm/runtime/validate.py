"""Server-side validation of client updates before aggregation.

Plain functions: each returns ``None`` when the check passes or a short reason naming the
tensor or the field. ``check_update`` runs them all. A rejected update is logged with its
reason and client id and never reaches the aggregator, so the server State cannot be
corrupted by a NaN, a tensor of the wrong name, shape or dtype, an oversized payload, or a
client holding a different base model (its fingerprint, ``core.state.fingerprint``, differs).

Dtypes (``check_dtypes``), against the payload spec: where the spec's tensor is floating
point, any floating dtype is accepted and the codec chain's decode casts it to the spec's
(``codecs/chain.py``): the chain legitimately produces other float dtypes (a ``quantize``
stage decodes to the dtype the sender named, ``fp16``/``bf16`` stages decode to float32,
whatever the spec's dtype). A float64 value beyond the spec dtype's range becomes inf in
that cast and is refused by ``check_finite``. A non-floating tensor (bool, int64, ...)
where the spec's is floating point is refused: the chain leaves it as it arrived, so this
check sees it (cast, a bool would count as a delta of 1.0). Where the spec's tensor is not
floating point (FedKSeed's int64 seeds), the dtype must be exactly the spec's.
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


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_dtypes(payload: State, reference: State) -> str | None:
    """Floating point where the spec is (any float dtype), else exactly the spec's dtype."""
    for name, t in payload.items():
        want = reference[name].dtype
        if reference[name].is_floating_point():
            if not t.is_floating_point():
                return f"dtype of '{name}' is {_name(t.dtype)}, expected a floating-point dtype ({_name(want)})"
        elif t.dtype != want:
            return f"dtype of '{name}' is {_name(t.dtype)}, expected {_name(want)}"
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
        check_dtypes(payload, reference),
    ):
        if reason is not None:
            return reason
    return check_finite(payload)
