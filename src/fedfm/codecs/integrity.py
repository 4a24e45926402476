"""An integrity check: CRC-32 (zlib) of everything a payload carries, in its metadata.

Truncation and malformed headers are always caught by the strict parser
(codecs/serialize.py) and the stages' own consistency checks (index ranges, counts,
scales); a flipped bit inside a float value, or inside a metadata value such as
``num_examples`` (the aggregation weight), is not, unless the chain ends with
``{checksum: true}``, which costs 8 hex characters of header.

The CRC covers, tensor by tensor in sorted name order, the name, the dtype, the shape and
the raw bytes, then the canonical JSON of the metadata (sorted keys, no spaces, ASCII)
without the ``__crc32`` entry itself. So any single flipped bit of the serialized payload
is either refused by the parser or by the CRC (``tests/test_codecs_checksum.py`` flips
every bit of a payload). Payloads carry no format version: a payload checksummed by a
fedfm that covered tensors only fails this check (both ends run the same code).
"""

from __future__ import annotations

import json
import zlib

import torch

from fedfm.codecs.base import CodecContext, CodecError, Payload, register_codec

CRC_META = "__crc32"


def payload_crc(payload: Payload) -> str:
    crc = 0
    for key in sorted(payload.tensors):
        t = payload.tensors[key].detach().contiguous().cpu()
        crc = zlib.crc32(f"{key}\0{t.dtype}\0{list(t.shape)}\0".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"", crc)
    meta = {k: str(v) for k, v in payload.meta.items() if k != CRC_META}
    crc = zlib.crc32(json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(), crc)
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
