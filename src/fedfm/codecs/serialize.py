"""The final stage of every chain: safetensors bytes, and their strict parsing.

Parsing checks the header length, that the JSON header is an object, that the metadata
is an object of strings, that every tensor entry is an object with a string ``dtype``, a
``shape`` of non-negative integers and ``data_offsets`` of two integers inside the data,
before handing the bytes to safetensors: a truncated, corrupted or hand-made payload
raises CodecError naming the tensor, never another exception.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedfm.codecs.base import CodecError, Payload


def to_bytes(payload: Payload) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in payload.tensors.items()}
    meta = {k: str(v) for k, v in payload.meta.items()}
    # An empty metadata dict with no tensors makes safetensors write a malformed header.
    return st_save(tensors, metadata=meta or None)


def from_bytes(data: bytes) -> Payload:
    if len(data) < 8:
        raise CodecError(f"payload of {len(data)} bytes is too short to hold a header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CodecError(f"payload truncated: header claims {n} bytes, {len(data) - 8} present")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"payload header is not valid JSON: {exc}") from None
    except RecursionError:
        raise CodecError("payload header is nested too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise CodecError(f"payload header is a JSON {type(header).__name__}, not an object of tensors")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CodecError("payload '__metadata__' is not an object of strings")
    body = len(data) - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = _entry_range(key, info)
        if not (0 <= start <= end <= body):
            raise CodecError(f"payload truncated: tensor '{key}' needs bytes {start}..{end} of {body}")
    try:
        tensors: dict[str, torch.Tensor] = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CodecError(f"payload could not be parsed: {exc}") from None
    return Payload(tensors=tensors, meta=dict(meta or {}))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry_range(key: str, info) -> tuple[int, int]:
    """The (start, end) byte offsets of one header entry, after checking its fields' types."""
    if not isinstance(info, dict):
        raise CodecError(f"payload tensor '{key}': its header entry is a JSON {type(info).__name__}, not an object")
    if not isinstance(info.get("dtype"), str):
        raise CodecError(f"payload tensor '{key}' has no valid dtype (got {info.get('dtype')!r})")
    shape = info.get("shape")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise CodecError(f"payload tensor '{key}' has no valid shape (got {shape!r}; a list of non-negative integers)")
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CodecError(f"payload tensor '{key}' has no valid data_offsets (got {offsets!r}; two integers)")
    return offsets[0], offsets[1]


def read_state_file(path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file a user names (``what``: the argument or config field
    that named it); a missing, unreadable or damaged file is a ValueError that says which and
    why, before anything is built from it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{what} {path}: not a readable safetensors file ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
