"""An integrity check: CRC-32 (zlib) of every tensor's bytes, in the payload metadata.

Truncation and malformed headers are always caught by the strict parser
(codecs/serialize.py) and the stages' own consistency checks (index ranges, counts,
scales); a flipped bit inside a float value is not, unless the chain ends with
``{checksum: true}``, which costs 8 hex characters of header.
"""

from __future__ import annotations

import zlib

import torch

from fedfm.codecs.base import CodecContext, CodecError, Payload, register_codec

CRC_META = "__crc32"


def payload_crc(payload: Payload) -> str:
    crc = 0
    for key in sorted(payload.tensors):
        t = payload.tensors[key].detach().contiguous().cpu()
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"", crc)
    return f"{crc:08x}"


class Checksum:
    name = "checksum"

    def __init__(self, params=None):
        self.params = params

    def encode(self, payload: Payload, ctx: CodecContext) -> Payload:
        return Payload(dict(payload.tensors), {**payload.meta, CRC_META: payload_crc(payload)})

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        meta = dict(payload.meta)
        sent = meta.pop(CRC_META, None)
        if sent is None:
            raise CodecError("payload has no checksum although the chain ends with 'checksum'")
        got = payload_crc(payload)
        if got != sent:
            raise CodecError(f"payload checksum mismatch: sent {sent}, received {got} (corrupted payload)")
        return Payload(dict(payload.tensors), meta)


register_codec("checksum", Checksum)
