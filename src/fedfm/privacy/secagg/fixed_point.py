"""Fixed-point encoding of real vectors into Z_{2^bits}, so that masks cancel exactly.

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") sums vectors in a finite group: each coordinate x
(clipped to [-bound, bound]) becomes round(x * 2^frac_bits) taken modulo 2^bits (two's
complement; words are held in numpy ``uint32``, whose arithmetic wraps modulo 2^32, and
reduced modulo 2^bits, which divides 2^32, so the reduction commutes with the sums). The
sum of n encodings decodes to the sum of the rounded values as long as
|sum| < 2^(bits-1), i.e. n * bound * 2^frac_bits < 2^(bits-1) (``capacity_problem`` says
when it is not). The rounding error of one coordinate is at most 2^-(frac_bits+1).
The weight word (the sum of the clients' weights, frac_bits 0) obeys the same rule: n
weights of at most ``weight_cap(n, bits)`` each sum below 2^(bits-1) (``weight_problem``).

``bits`` defaults to 32 (the whole uint32 word); runs use 24 (``params.py``'s default,
at most 24): there the masked words travel as float32 values, exact below 2^24.
"""

from __future__ import annotations

import numpy as np

MODULUS_BITS = 32


def ring_mask(bits: int) -> np.uint32:
    if not 1 <= bits <= 32:
        raise ValueError(f"secure aggregation: the modulus is 2^bits with 1 <= bits <= 32, got bits {bits}")
    return np.uint32((1 << bits) - 1)


def capacity_problem(n: int, bound: float, frac_bits: int, bits: int = MODULUS_BITS) -> str | None:
    """Why n encoded vectors of values in [-bound, bound] could overflow their sum, or None."""
    worst = n * bound * 2.0**frac_bits
    if worst >= 2.0 ** (bits - 1):
        return (f"secure aggregation: {n} clients x bound {bound} x 2^{frac_bits} = {worst:.3g} "
                f">= 2^{bits - 1}: the sum would wrap; lower frac_bits or the clip bound")
    return None


def weight_cap(n: int, bits: int) -> int:
    """The largest weight one of n clients may send so that n such weights sum below 2^(bits-1)."""
    return (2 ** (bits - 1) - 1) // max(n, 1)


def weight_problem(n: int, max_weight: int, bits: int) -> str | None:
    """Why n weights of up to ``max_weight`` could wrap their summed word, or None."""
    if n * max_weight >= 2 ** (bits - 1):
        return (f"secure aggregation: {n} clients x weight up to {max_weight} = {n * max_weight:,} >= 2^{bits - 1}: "
                "the summed weight would wrap")
    return None


def encode(x: np.ndarray, bound: float, frac_bits: int, bits: int = MODULUS_BITS) -> np.ndarray:
    """float vector -> uint32 vector of words < 2^bits (clipped to [-bound, bound], rounded to nearest)."""
    clipped = np.clip(np.asarray(x, dtype=np.float64), -bound, bound)
    ints = np.rint(clipped * 2.0**frac_bits).astype(np.int64)
    return ints.astype(np.uint32) & ring_mask(bits)  # two's complement modulo 2^bits


def decode(v: np.ndarray, frac_bits: int, bits: int = MODULUS_BITS) -> np.ndarray:
    """uint32 vector (an encoding or a sum of encodings, modulo 2^bits) -> float vector."""
    w = (np.asarray(v, dtype=np.uint32) & ring_mask(bits)).astype(np.int64)
    signed = np.where(w >= (1 << (bits - 1)), w - (1 << bits), w)
    return signed.astype(np.float64) / 2.0**frac_bits


def add(*vectors: np.ndarray, bits: int = MODULUS_BITS) -> np.ndarray:
    """Sum modulo 2^bits."""
    out = np.zeros_like(vectors[0], dtype=np.uint32)
    for v in vectors:
        out += v.astype(np.uint32)
    return out & ring_mask(bits)
