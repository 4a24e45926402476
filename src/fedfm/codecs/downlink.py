"""Downlink delta: the server's broadcast sent as the difference against what this client
last received, so that the later stages of the down chain (top-k, quantize) compress a
small change instead of the whole State (the "model difference" downlink of e.g.
Sattler, Wiedemann, Mueller and Samek 2019, "Robust and Communication-Efficient
Federated Learning from Non-IID Data", which also sparsifies the broadcast).

Put ``delta`` first in ``codecs.down``: ``[{delta: true}, {topk: 0.1}, {quantize: 8}]``.
What the client reconstructs (previous + decoded delta, lossy stages included) is kept in
the client store under ``down_last``; the next delta is taken against that
reconstruction, so quantization and sparsification errors are corrected in later rounds
instead of accumulating. A client that never received anything gets the full State.
In simulation the server and the client read the same store; on separate machines the
server keeps the mirror of each client's reconstruction by decoding what it sent.
"""

from __future__ import annotations

import torch

from fedfm.codecs.base import CodecContext, CodecError, Payload, StageParams, register_codec

KEY = "down_last"
DELTA_META = "__delta"


class DeltaParams(StageParams):
    def direction_problem(self, direction: str) -> str | None:
        if direction != "down":
            return "'delta' compresses the server broadcast: use it in codecs.down only"
        return None


class DownlinkDelta:
    name = "delta"

    def __init__(self, params: StageParams | None = None):
        self.params = params

    def _check(self, ctx: CodecContext) -> None:
        if ctx.direction != "down":
            raise CodecError("the 'delta' stage compresses the server broadcast: use it in codecs.down only")
        if ctx.store is None or ctx.cid is None:
            raise CodecError("the 'delta' stage needs a client store and a client id in the codec context")

    def encode(self, payload: Payload, ctx: CodecContext) -> Payload:
        self._check(ctx)
        prev = ctx.store.get(ctx.cid, KEY)
        meta = dict(payload.meta)
        tensors = payload.tensors
        if prev is not None and _same_layout(prev, tensors):
            tensors = {k: t - prev[k].to(t.dtype) for k, t in tensors.items()}
            meta[DELTA_META] = "1"
        else:
            meta[DELTA_META] = "0"
        return Payload(dict(tensors), meta)

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        self._check(ctx)
        meta = dict(payload.meta)
        flag = meta.pop(DELTA_META, None)
        tensors = payload.tensors
        if flag == "1":
            prev = ctx.store.get(ctx.cid, KEY)
            if prev is None or not _same_layout(prev, tensors):
                raise CodecError(f"client {ctx.cid}: a downlink delta arrived but the last received State is missing or differs")
            tensors = {k: prev[k].to(t.dtype) + t for k, t in tensors.items()}
        elif flag != "0":
            raise CodecError(f"downlink payload lacks a valid '{DELTA_META}' flag (got {flag!r})")
        ctx.store.put(ctx.cid, KEY, tensors)
        return Payload(dict(tensors), meta)


def _same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)


register_codec("delta", DownlinkDelta, DeltaParams)
