"""Shamir t-of-n secret sharing (Shamir 1979, "How to Share a Secret") of 32-byte seeds.

A secret s < 2^256 is the constant term of a random polynomial of degree t-1 over the
prime field GF(p), p = 2^521 - 1 (a Mersenne prime, larger than any secret); share i is
(i, f(i)) for i = 1..n. Any t shares give s back by Lagrange interpolation at 0; fewer
reveal nothing. Coefficients come from the operating system's CSPRNG (``secrets``).

Written here because no well-kept Python package offers Shamir sharing over a field this
size (``cryptography`` has none; PyCryptodome's ``Crypto.Protocol.SecretSharing`` is
limited to 16-byte secrets); it is 40 lines of textbook arithmetic, tested against its
definition.
"""

from __future__ import annotations

import secrets
from typing import Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, t: int, n: int) -> list[tuple[int, int]]:
    """n shares (x, y) of a secret of at most 32 bytes, any t of which recover it."""
    if not 1 <= t <= n:
        raise ValueError(f"shamir: need 1 <= t ({t}) <= n ({n})")
    if len(secret) > 32:
        raise ValueError(f"shamir: secrets are at most 32 bytes, got {len(secret)}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def combine(shares: Sequence[tuple[int, int]], length: int = 32) -> bytes:
    """The secret from shares (any t of them, distinct x); Lagrange interpolation at 0."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError(f"shamir: share indices must be distinct and nonzero, got {xs}")
    s = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        s = (s + yi * num * pow(den, -1, PRIME)) % PRIME
    if s >= 2 ** (8 * length):
        raise ValueError("shamir: the shares do not interpolate to a secret of the expected size (malformed share)")
    return s.to_bytes(length, "big")


def share_bytes(share: tuple[int, int]) -> bytes:
    return share[0].to_bytes(4, "big") + share[1].to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> tuple[int, int]:
    if len(data) != 4 + SHARE_BYTES:
        raise ValueError(f"shamir: a share is {4 + SHARE_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")
