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
The delta is taken tensor by tensor: a tensor the client did not receive last time, or
received with another shape, travels whole, and what the client holds of a tensor not
sent this time stays for a later round (FedRA's sub-models, whose allocated layers change
every round: the head, and a layer the client was allocated before, travel as deltas). The
payload's ``__delta`` entry says which: ``1`` every tensor, ``0`` none, else the JSON list
of the names sent as deltas. In simulation the server and the client read the same store; on separate machines the
server keeps the mirror of each client's reconstruction by decoding what it sent.
"""

from __future__ import annotations

import json

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
        prev = ctx.store.get(ctx.cid, KEY) or {}
        meta = dict(payload.meta)
        tensors = dict(payload.tensors)
        held = [k for k, t in tensors.items() if k in prev and prev[k].shape == t.shape]
        for k in held:
            tensors[k] = tensors[k] - prev[k].to(tensors[k].dtype)
        meta[DELTA_META] = "0" if not held else "1" if len(held) == len(tensors) else json.dumps(sorted(held))
        return Payload(tensors, meta)

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        self._check(ctx)
        meta = dict(payload.meta)
        names = _delta_names(meta.pop(DELTA_META, None), payload.tensors)
        tensors = dict(payload.tensors)
        prev = ctx.store.get(ctx.cid, KEY) or {}
        if names:
            missing = [k for k in names if k not in prev or prev[k].shape != tensors[k].shape]
            if missing:
                raise CodecError(f"client {ctx.cid}: a downlink delta of {missing[:3]} arrived but the last received State "
                                 "lacks them or holds another shape")
            for k in names:
                tensors[k] = prev[k].to(tensors[k].dtype) + tensors[k]
        ctx.store.put(ctx.cid, KEY, {**prev, **tensors})  # a tensor not sent this time stays as last received
        return Payload(tensors, meta)


def _delta_names(flag: str | None, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names a payload's ``__delta`` entry says were sent as deltas."""
    if flag == "1":
        return list(tensors)
    if flag == "0":
        return []
    try:
        names = json.loads(flag) if flag is not None else None
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) and n in tensors for n in names):
        raise CodecError(f"downlink payload lacks a valid '{DELTA_META}' entry (got {flag!r}): '1', '0' or a list of its tensors")
    return names


register_codec("delta", DownlinkDelta, DeltaParams)
