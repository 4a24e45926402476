"""Sparse tensor wire formats and the per-tensor choice of the cheapest one.

A tensor of ``n`` elements with ``k`` kept entries (sorted indices ``idx``, values ``v``)
can travel as:

- ``dense``: the tensor itself, zeros included (n values);
- ``bitmap``: ``w.__values`` (k values) + ``w.__bitmap`` (n bits packed into ceil(n/8) bytes);
- ``delta``: ``w.__values`` + ``w.__delta``: the first index, then the gaps between
  consecutive indices, in the narrowest unsigned type that holds the largest (1, 2, 4 or
  8 bytes per index);
- ``seeded`` (random-k only): ``w.__values`` alone; the receiver redraws the indices.

The choice is made per tensor by the exact size of each candidate serialized on its own
(``len()`` of its safetensors bytes, header included), not by a formula; ties go to the
first in the order dense, bitmap, delta.
"""

from __future__ import annotations

import torch

from fedfm.codecs.base import CodecError, Payload
from fedfm.codecs.packing import narrowest_uint, pack_bits, unpack_bits
from fedfm.codecs.serialize import to_bytes

VALUES, BITMAP, DELTA = ".__values", ".__bitmap", ".__delta"


def densify(values: torch.Tensor, idx: torch.Tensor, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    flat = torch.zeros(n, dtype=values.dtype)  # (n,)
    flat[idx] = values
    return flat.reshape(shape)


def candidates(name: str, values: torch.Tensor, idx: torch.Tensor, shape: tuple[int, ...], send_index: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Every wire form of one sparse tensor, by format name."""
    n = int(torch.Size(shape).numel())
    out = {"dense": {name: densify(values, idx, n, shape)}}
    if not send_index:
        out["seeded"] = {name + VALUES: values}
        return out
    mask = torch.zeros(n, dtype=torch.uint8)  # (n,)
    mask[idx] = 1
    out["bitmap"] = {name + VALUES: values, name + BITMAP: pack_bits(mask, 1)}
    gaps = torch.diff(idx, prepend=idx.new_zeros(1)) if idx.numel() else idx  # (k,) first = idx[0]
    top = int(gaps.max()) if gaps.numel() else 0
    out["delta"] = {name + VALUES: values, name + DELTA: gaps.to(narrowest_uint(top))}
    return out


def cheapest(options: dict[str, dict[str, torch.Tensor]]) -> tuple[str, dict[str, torch.Tensor]]:
    """The candidate with the fewest serialized bytes (exact, header included)."""
    sizes = {fmt: len(to_bytes(Payload(t, {}))) for fmt, t in options.items()}
    fmt = min(sizes, key=lambda f: sizes[f])  # dict order breaks ties
    return fmt, options[fmt]


def encode_sparse(name: str, values: torch.Tensor, idx: torch.Tensor, shape: tuple[int, ...], send_index: bool = True) -> dict[str, torch.Tensor]:
    return cheapest(candidates(name, values, idx, shape, send_index))[1]


def decode_indices(name: str, tensors: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor | None:
    """Sorted int64 indices of tensor ``name`` from its bitmap or gaps; None if neither is sent."""
    if name + BITMAP in tensors:
        mask = unpack_bits(tensors[name + BITMAP], 1, n)  # (n,)
        idx = mask.nonzero().reshape(-1)
    elif name + DELTA in tensors:
        gaps = tensors[name + DELTA]
        if gaps.dtype not in (torch.uint8, torch.uint16, torch.uint32, torch.int64) or gaps.dim() != 1:
            raise CodecError(f"'{name}{DELTA}' must be a 1-D unsigned tensor, got {gaps.dtype}")
        gaps = gaps.to(torch.int64)
        if gaps.numel() > 1 and int(gaps[1:].min()) < 1:
            raise CodecError(f"'{name}{DELTA}': indices are not strictly increasing (corrupted payload)")
        idx = torch.cumsum(gaps, 0)
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n):
            raise CodecError(f"'{name}{DELTA}': index {int(idx[-1])} out of range for {n} elements")
    else:
        return None
    if idx.numel() != k:
        raise CodecError(f"'{name}': {idx.numel()} indices for {k} values (corrupted payload)")
    return idx
