"""The final stage of every chain: safetensors bytes, and their strict parsing.

Parsing checks the header length, the JSON header and every tensor's byte range before
handing the bytes to safetensors, so a truncated or corrupted payload raises CodecError.
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
    body = len(data) - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CodecError(f"payload tensor '{key}' has no valid data_offsets") from None
        if not (0 <= start <= end <= body):
            raise CodecError(f"payload truncated: tensor '{key}' needs bytes {start}..{end} of {body}")
    try:
        tensors: dict[str, torch.Tensor] = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CodecError(f"payload could not be parsed: {exc}") from None
    return Payload(tensors=tensors, meta=dict(header.get("__metadata__") or {}))


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
