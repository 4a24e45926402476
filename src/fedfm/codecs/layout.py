"""Payload conventions that let stages compose, and per-tensor seeds.

A dense tensor travels under its State name. A stage that changes a tensor's form
replaces it by *suffixed* entries ``<name>.__<part>``:

- sparsify: ``w.__values`` (kept values, 1-D) plus one index form, ``w.__bitmap``
  (1 bit per element, packed) or ``w.__delta`` (gaps between sorted indices in the
  narrowest unsigned type); random-k sends no index at all (both sides draw it).
- quantize: any floating tensor ``t`` (dense ``w`` or ``w.__values``) becomes
  ``t.__q`` (packed codes, uint8) and ``t.__scale`` (one float32 per block); the
  meta key ``t.__q`` holds ``"<count>,<dtype>,<shape>"`` (e.g. ``"307,F32,307"``).

So ``[topk, quantize]`` quantizes only the kept values, ``[quantize, topk]`` sparsifies
nothing (no dense float tensor is left), and every stage ignores what it does not own.
The base name (before the first ``.__``) is always a key of the reference State.
"""

from __future__ import annotations

import zlib

import torch

from fedfm.core.seeding import derive_seed

SEP = ".__"
DIRECTIONS = {"up": 1, "down": 2}
DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def base_name(key: str) -> str:
    return key.split(SEP, 1)[0]


def is_dense_float(key: str, t: torch.Tensor) -> bool:
    """A floating tensor still under its State name (what sparsifiers and casts act on)."""
    return SEP not in key and t.is_floating_point()


def tensor_generator(ctx, salt: int, name: str) -> torch.Generator:
    """A torch.Generator seeded from (seed, round, cid, direction, salt, name): both ends of
    the wire draw the same numbers without sending anything."""
    cid = 0xFFFFFF if ctx.cid is None else int(ctx.cid)
    seed = derive_seed(ctx.seed, ctx.round, cid, DIRECTIONS.get(ctx.direction, 0), salt, zlib.crc32(name.encode()))
    return torch.Generator().manual_seed(seed)


def reference_numel(ctx, name: str) -> tuple[int, tuple[int, ...]]:
    from fedfm.codecs.base import CodecError

    ref = ctx.reference.get(name)
    if ref is None:
        raise CodecError(f"payload entry '{name}' is not in the reference State")
    return ref.numel(), tuple(ref.shape)
