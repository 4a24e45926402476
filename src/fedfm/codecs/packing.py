"""Bit packing: b-bit codes (b in 1, 2, 4, 8) packed into uint8 bytes, and the narrowest
unsigned integer type for non-negative integers.

``n`` codes of ``b`` bits take exactly ``ceil(n * b / 8)`` bytes: a 4-bit tensor really
takes half the bytes of an 8-bit one. Codes are packed little-end first: code ``j`` of a
byte sits in bits ``j*b .. j*b+b-1``. Written by hand because neither torch nor
safetensors has sub-byte dtypes that serialize (torch.uint1..uint7 are not storable);
numpy.packbits covers only b = 1.
"""

from __future__ import annotations

import torch

from fedfm.codecs.base import CodecError

BITS = (1, 2, 4, 8)
# Unsigned widths safetensors stores, narrowest first (uint64 is stored as int64: n < 2**63).
UINT_TYPES = ((torch.uint8, 255), (torch.uint16, 2**16 - 1), (torch.uint32, 2**32 - 1), (torch.int64, 2**63 - 1))


def packed_nbytes(n: int, bits: int) -> int:
    """Exact bytes of ``n`` packed ``bits``-bit codes."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n,) integer codes in [0, 2**bits) -> (ceil(n*bits/8),) uint8."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    codes = codes.reshape(-1).to(torch.uint8)  # (n,)
    if bits == 8:
        return codes.clone()
    per = 8 // bits
    n = codes.numel()
    padded = torch.zeros(packed_nbytes(n, bits) * per, dtype=torch.uint8)
    padded[:n] = codes
    groups = padded.view(-1, per).to(torch.int32)  # (nbytes, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits  # (per,)
    return (groups << shifts).sum(dim=1).to(torch.uint8)  # (nbytes,)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(ceil(n*bits/8),) uint8 -> (n,) uint8 codes; raises CodecError on a wrong length."""
    if bits not in BITS:
        raise CodecError(f"bits must be one of {BITS}, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise CodecError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    expected = packed_nbytes(n, bits)
    if packed.numel() != expected:
        raise CodecError(f"packed codes hold {packed.numel()} bytes, expected {expected} for {n} codes of {bits} bits")
    if bits == 8:
        return packed.clone()
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits  # (per,)
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # (nbytes, per)
    return codes.reshape(-1)[:n].to(torch.uint8)  # (n,)


def narrowest_uint(max_value: int) -> torch.dtype:
    """The narrowest unsigned type (uint8, uint16, uint32, else int64) that holds ``max_value``."""
    for dtype, top in UINT_TYPES:
        if max_value <= top:
            return dtype
    raise ValueError(f"{max_value} does not fit in 63 bits")


def dtype_nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
