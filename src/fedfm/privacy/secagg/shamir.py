"""Shamir t-of-n secret sharing (Shamir 1979, "How to Share a Secret") of 32-byte seeds.

A secret s < 2^256 is the constant term of a random polynomial of degree t-1 over the
prime field GF(p), p = 2^521 - 1 (a Mersenne prime, larger than any secret); share i is
(i, f(i)) for i = 1..n. Any t shares give s back by Lagrange interpolation at 0; fewer
reveal nothing. Coefficients come from the operating system's CSPRNG (``secrets``).

Written here because no well-kept Python package offers Shamir sharing over a field this
size (``cryptography`` has none; PyCryptodome's ``Crypto.Protocol.SecretSharing`` is
limited to 16-byte secrets); it is textbook arithmetic, tested against its
definition.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
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
    return secret_of(evaluator(shares)(0), length)


def secret_of(value: int, length: int = 32) -> bytes:
    """f(0) as the secret's bytes; a value too large for a secret means a malformed share."""
    if value >= 2 ** (8 * length):
        raise ValueError("shamir: the shares do not interpolate to a secret of the expected size (malformed share)")
    return value.to_bytes(length, "big")


@lru_cache(maxsize=256)
def _inverse_denominators(xs: tuple[int, ...]) -> tuple[int, ...]:
    """1 / prod_{m != j} (x_j - x_m) for every j: the same for every secret whose shares
    come from the same holders (a round's secrets mostly do), so it is computed once."""
    out = []
    for j, xj in enumerate(xs):
        den = 1
        for m, xm in enumerate(xs):
            if m != j:
                den = den * (xj - xm) % PRIME
        out.append(pow(den, -1, PRIME))
    return tuple(out)


def evaluator(shares: Sequence[tuple[int, int]]):
    """f(x) for the polynomial through ``shares`` (t of them, distinct x), in O(t) per x:
    f(x) = sum_j y_j N_j(x) / D_j with D_j = prod_{m != j} (x_j - x_m) inverted once per
    set of indices (``_inverse_denominators``) and N_j(x) = prod_{m != j} (x - x_m) from
    prefix and suffix products. Checking the n - t other shares of a secret this way costs
    O(n t), not the O(n t^2) of one interpolation per share."""
    xs, ys = tuple(x for x, _ in shares), [y for _, y in shares]
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError(f"shamir: share indices must be distinct and nonzero, got {list(xs)}")
    coef = [y * inv % PRIME for y, inv in zip(ys, _inverse_denominators(xs))]

    def at(x: int) -> int:
        t = len(xs)
        prefix = [1] * (t + 1)
        for i, xi in enumerate(xs):
            prefix[i + 1] = prefix[i] * (x - xi) % PRIME
        total, suffix = 0, 1
        for j in range(t - 1, -1, -1):
            total = (total + coef[j] * prefix[j] % PRIME * suffix) % PRIME
            suffix = suffix * (x - xs[j]) % PRIME
        return total

    return at


@lru_cache(maxsize=256)
def _check_weights(used: tuple[int, ...], extra: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(r_e, v_j): random weights r_e of the extra indices, and v_j = sum_e r_e L_j(x_e) with
    L_j the Lagrange basis of ``used``; once per set of holders, O(len(extra) * len(used))."""
    inv = _inverse_denominators(used)
    r = tuple(secrets.randbelow(PRIME - 1) + 1 for _ in extra)
    v = [0] * len(used)
    for re, xe in zip(r, extra):
        t = len(used)
        prefix = [1] * (t + 1)
        for i, xi in enumerate(used):
            prefix[i + 1] = prefix[i] * (xe - xi) % PRIME
        suffix = 1
        for j in range(t - 1, -1, -1):  # L_j(x_e) = prod_{m != j} (x_e - x_m) / D_j
            v[j] = (v[j] + re * (prefix[j] * suffix % PRIME) % PRIME * inv[j]) % PRIME
            suffix = suffix * (xe - used[j]) % PRIME
    return r, tuple(v)


def all_on(used: Sequence[tuple[int, int]], extra: Sequence[tuple[int, int]]) -> bool:
    """Whether every ``extra`` share lies on the polynomial through ``used`` (distinct x,
    none of ``extra``'s x among them), in O(len(used) + len(extra)) per secret: with random
    r_e, sum_e r_e (y_e - f(x_e)) = sum_e r_e y_e - sum_j v_j y_j is 0 for consistent
    shares, and nonzero for any other with probability 1 - 1/(p - 1) (the r_e are drawn once
    per set of holders and stay with the server). A False asks ``evaluator`` which."""
    if not extra:
        return True
    r, v = _check_weights(tuple(x for x, _ in used), tuple(x for x, _ in extra))
    total = sum(re * y for re, (_, y) in zip(r, extra)) - sum(vj * y for vj, (_, y) in zip(v, used))
    return total % PRIME == 0


def share_bytes(share: tuple[int, int]) -> bytes:
    return share[0].to_bytes(4, "big") + share[1].to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> tuple[int, int]:
    if len(data) != 4 + SHARE_BYTES:
        raise ValueError(f"shamir: a share is {4 + SHARE_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")
