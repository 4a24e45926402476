"""Compact framing: put last in a chain to shrink the safetensors header.

Each safetensors entry costs a JSON header record with its full name (LoRA names run to
~70 characters), dtype, shape and offsets: ~120 bytes, which is more than the data of a
sparsified, 4-bit tensor. Both ends know the reference State, so names need not travel:
``compact`` renames every entry to its position in the sorted reference State (``12``,
``12v``, ``12vq``, ...), concatenates all entries of one dtype into a single flat tensor,
and sends the layout (short name, shape) once in the metadata. Lossless.
"""

from __future__ import annotations

import re

import torch

from fedfm.codecs.base import CodecContext, CodecError, Payload, register_codec
from fedfm.codecs.layout import SEP

LAYOUT_META = "__layout"
PARTS = {"values": "v", "bitmap": "b", "delta": "d", "q": "q", "scale": "s"}
LETTERS = {v: k for k, v in PARTS.items()}
DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
SHORT = re.compile(r"^(\d+)((?:[a-z]|\([A-Za-z0-9_]+\))*)$")


def shorten(key: str, ids: dict[str, int]) -> str:
    base, *parts = key.split(SEP)
    if base not in ids:
        raise CodecError(f"payload entry '{key}' is not named after the reference State")
    return str(ids[base]) + "".join(PARTS.get(p, f"({p})") for p in parts)


def expand(short: str, names: list[str]) -> str:
    m = SHORT.match(short)
    if not m or int(m.group(1)) >= len(names):
        raise CodecError(f"compact layout names an unknown entry '{short}' (corrupted payload)")
    parts = re.findall(r"[a-z]|\([A-Za-z0-9_]+\)", m.group(2))
    return names[int(m.group(1))] + "".join(SEP + (LETTERS[p] if p in LETTERS else p[1:-1]) for p in parts)


class Compact:
    name = "compact"

    def __init__(self, params=None):
        self.params = params

    def encode(self, payload: Payload, ctx: CodecContext) -> Payload:
        names = sorted(ctx.reference)
        ids = {n: i for i, n in enumerate(names)}
        groups: dict[str, list[torch.Tensor]] = {}
        layout = []
        for key in sorted(payload.tensors, key=lambda k: shorten(k, ids)):
            t = payload.tensors[key]
            if t.dtype not in NAMES:
                raise CodecError(f"compact: dtype {t.dtype} of '{key}' is not supported")
            dt = NAMES[t.dtype]
            groups.setdefault(dt, []).append(t.reshape(-1))
            layout.append(f"{shorten(key, ids)}:{dt}:{'x'.join(map(str, t.shape))}")
        meta = {}
        for k, v in payload.meta.items():
            meta[shorten(k, ids) if k.split(SEP)[0] in ids else k] = v
        meta[LAYOUT_META] = ";".join(layout)
        return Payload({dt: torch.cat(ts) for dt, ts in groups.items()}, meta)

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        names = sorted(ctx.reference)
        meta = dict(payload.meta)
        layout = meta.pop(LAYOUT_META, None)
        if layout is None:
            raise CodecError("compact payload has no layout metadata")
        offsets = {dt: 0 for dt in payload.tensors}
        out: dict[str, torch.Tensor] = {}
        for entry in filter(None, layout.split(";")):
            try:
                short, dt, shape = entry.split(":")
                dims = tuple(int(d) for d in shape.split("x")) if shape else ()
            except ValueError:
                raise CodecError(f"compact layout entry '{entry}' is malformed (corrupted payload)") from None
            flat = payload.tensors.get(dt)
            n = int(torch.Size(dims).numel())
            if flat is None or flat.dtype != DTYPES.get(dt) or offsets[dt] + n > flat.numel():
                raise CodecError(f"compact layout entry '{entry}' does not fit the payload (corrupted payload)")
            out[expand(short, names)] = flat[offsets[dt] : offsets[dt] + n].reshape(dims)
            offsets[dt] += n
        for dt, used in offsets.items():
            if used != payload.tensors[dt].numel():
                raise CodecError(f"compact payload: {payload.tensors[dt].numel() - used} {dt} entries not in the layout (corrupted payload)")
        renamed = {}
        for k, v in meta.items():
            renamed[expand(k, names) if SHORT.match(k) else k] = v
        return Payload(out, renamed)


register_codec("compact", Compact)
