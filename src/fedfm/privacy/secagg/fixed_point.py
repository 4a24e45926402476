"""Fixed-point encoding of real vectors into Z_{2^32}, so that masks cancel exactly.

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") sums vectors in a finite group: each coordinate x
(clipped to [-bound, bound]) becomes round(x * 2^frac_bits) taken modulo 2^32 (two's
complement, numpy ``uint32`` arithmetic wraps exactly there). The sum of n encodings
decodes to the sum of the rounded values as long as |sum| < 2^31, i.e.
n * bound * 2^frac_bits < 2^31 (``capacity_problem`` says when it is not). The rounding
error of one coordinate is at most 2^-(frac_bits+1).
"""

from __future__ import annotations

import numpy as np

MODULUS_BITS = 32


def capacity_problem(n: int, bound: float, frac_bits: int) -> str | None:
    """Why n encoded vectors of values in [-bound, bound] could overflow their sum, or None."""
    worst = n * bound * 2.0**frac_bits
    if worst >= 2.0**31:
        return (f"secure aggregation: {n} clients x bound {bound} x 2^{frac_bits} = {worst:.3g} "
                f">= 2^31: the sum would wrap; lower frac_bits or the clip bound")
    return None


def encode(x: np.ndarray, bound: float, frac_bits: int) -> np.ndarray:
    """float vector -> uint32 vector (clipped to [-bound, bound], rounded to nearest)."""
    clipped = np.clip(np.asarray(x, dtype=np.float64), -bound, bound)
    ints = np.rint(clipped * 2.0**frac_bits).astype(np.int64)
    return ints.astype(np.uint32)  # two's complement modulo 2^32


def decode(v: np.ndarray, frac_bits: int) -> np.ndarray:
    """uint32 vector (an encoding or a sum of encodings) -> float vector."""
    return np.asarray(v, dtype=np.uint32).view(np.int32).astype(np.float64) / 2.0**frac_bits


def add(*vectors: np.ndarray) -> np.ndarray:
    """Sum modulo 2^32."""
    out = np.zeros_like(vectors[0], dtype=np.uint32)
    for v in vectors:
        out += v.astype(np.uint32)
    return out
