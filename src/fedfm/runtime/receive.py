"""The server's side of one reply: size check, decode, validate (runtime/validate.py).

Plain functions over the bytes a client sent; the loop decides what a rejection means.
"""

from __future__ import annotations

from fedfm.codecs import CodecChain, CodecContext, CodecError
from fedfm.core.types import State, Update
from fedfm.runtime.validate import check_size, check_update
from fedfm.runtime.wire import metrics_from_meta, metrics_problem


def receive_update(
    chain: CodecChain,
    data: bytes,
    rnd: int,
    cid: int,
    spec: State,
    seed: int,
    max_bytes: int | None,
    fingerprint: str | None,
) -> tuple[Update | None, str | None]:
    """(update, None) or (None, reason) for one client's bytes."""
    reason = check_size(len(data), max_bytes)
    if reason is not None:
        return None, reason
    ctx = CodecContext("up", rnd, cid, spec, seed=seed)
    try:
        payload, meta = chain.decode(data, ctx)
    except CodecError as exc:
        return None, f"decode failed: {exc}"
    if meta.get("cid") != str(cid):
        return None, f"payload claims to come from client {meta.get('cid')}"
    reason = check_update(payload, meta, spec, fingerprint) or metrics_problem(meta)
    if reason is not None:
        return None, reason
    return Update(cid=cid, payload=payload, num_examples=int(meta["num_examples"]), metrics=metrics_from_meta(meta), meta=meta), None
