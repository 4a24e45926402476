"""What the phases of secure aggregation (``exchange.py``, ``mask.py``, ``unmask.py``)
share: the error, the default threshold, the byte layout of ids and shares, the mask
vector of one client, and the checked Shamir reconstruction.

Nothing here imports ``cryptography`` at module level (it is the optional extra
``privacy``), so a config can be checked without it.
"""

from __future__ import annotations

import itertools
import struct
from typing import Callable

import numpy as np
import torch

from fedfm.privacy.secagg import fixed_point, shamir

SHARE_RECORD = 4 + shamir.SHARE_BYTES  # x (4) || y (66)
CIPHERTEXT = 12 + 4 + 4 + 2 * SHARE_RECORD + 16  # nonce || AES-GCM(u || v || s-share || b-share) || tag = 176


class SecAggError(RuntimeError):
    """The sum cannot be recovered (too few clients or shares left)."""


def default_threshold(n: int) -> int:
    """t = n - floor(n/3): recovers with up to a third dropped, and t > n/2 for n >= 2. At
    least 2: the sum of one client's input is that input, so a round left with one client
    fails instead of handing it to the server."""
    return max(2, n - n // 3)


def crypto():
    """The cryptographic primitives (``crypto.py``), with a clear error without the extra."""
    try:
        from fedfm.privacy.secagg import crypto as module
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"secure aggregation needs the 'cryptography' package (pip install 'fedfm[privacy]'): {exc}") from None
    return module


def id_bytes(u: int) -> bytes:
    return struct.pack(">I", int(u))


def id_of(b: bytes) -> int:
    return struct.unpack(">I", bytes(b[:4]))[0]


def as_tensor(data: bytes, width: int | None = None) -> torch.Tensor:
    """Bytes as a uint8 tensor (rows of ``width`` bytes when given)."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return t.reshape(-1, width) if width is not None else t


def as_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.uint8).contiguous().numpy().tobytes()


def rows(t: torch.Tensor, width: int, what: str) -> list[bytes]:
    data = as_bytes(t)
    if len(data) % width:
        raise ValueError(f"secagg: {what} of {len(data)} bytes is not a whole number of {width}-byte records")
    return [data[i : i + width] for i in range(0, len(data), width)]


def ids_text(ids) -> str:
    return ",".join(str(int(u)) for u in sorted(ids))


def ids_from(text: str) -> list[int]:
    return [int(u) for u in text.split(",") if u != ""]


def pairwise_mask(s_sk: bytes, other_s_pk: bytes, length: int) -> np.ndarray:
    """PRG(s_uv): the mask a pair agrees on (X25519 of the mask keys, HKDF, ChaCha20)."""
    c = crypto()
    return c.prg(c.agree(s_sk, other_s_pk, b"mask"), length)


def mask_vector(cid: int, b: bytes, s_sk: bytes, s_pks: dict[int, bytes], members: list[int], length: int, bits: int) -> np.ndarray:
    """PRG(b_u) + sum over v in members, v != u of sign(u, v) PRG(s_uv), modulo 2^bits;
    sign +1 when u < v and -1 when u > v, so the pairwise parts cancel in the sum."""
    m = crypto().prg(b, length)
    for v in members:
        if v == cid:
            continue
        p = pairwise_mask(s_sk, s_pks[v], length)
        m = m + p if cid < v else m - p
    return m & fixed_point.ring_mask(bits)


MAX_TRIES = 512  # t-subsets tried before a secret whose shares disagree is given up


def subsets_by_prefix(n: int, t: int):
    """The t-subsets of range(n), those inside the shortest prefix first: with e malformed
    shares among the first ones, the first good subset comes within C(t + e - 1, t - 1) + ...
    tries, not after the C(n - 1, t - 1) subsets that hold the first share."""
    for last in range(t - 1, n):
        for head in itertools.combinations(range(last), t - 1):
            yield head + (last,)


def recover(what: str, shares: list[tuple[int, int]], t: int, valid: Callable[[bytes], bool], notes: list[str],
            holders: dict[int, int] | None = None) -> bytes:
    """The secret of ``shares`` from some t of them that reconstruct a ``valid`` secret
    (checked against a commitment or a public key); shares off that polynomial are noted.
    At most ``MAX_TRIES`` t-subsets are tried (``subsets_by_prefix``), so a secret with many
    malformed shares fails in bounded time, naming the clients (``holders``: share index ->
    client id) whose shares do not agree."""
    if len(shares) < t:
        raise SecAggError(f"secagg: {len(shares)} shares of {what}, fewer than the threshold {t}")
    tries = 0
    for idx in subsets_by_prefix(len(shares), t):
        if tries == MAX_TRIES:
            break
        tries += 1
        subset = [shares[i] for i in idx]
        try:
            f = shamir.evaluator(subset)  # the subset's polynomial: the secret at 0, the other shares checked on it
            secret = shamir.secret_of(f(0))
        except ValueError:
            continue
        if valid(secret):
            used = dict(subset)  # a share off the subset's polynomial is malformed
            extra = [(x, y) for x, y in shares if x not in used]
            bad = [x for x, y in shares if x in used and used[x] != y]
            if not shamir.all_on(subset, extra):  # one sum for all of them; share by share only if it fails
                bad += [x for x, y in extra if f(x) != y]
            for x in sorted(bad, key=[x for x, _ in shares].index):
                notes.append(f"share {x} of {what} is malformed; not used")
            return secret
    who = ", ".join(f"client {holders[x]}" if holders and x in holders else f"share {x}" for x, _ in shares)
    raise SecAggError(f"secagg: no {t} of the {len(shares)} shares of {what} reconstruct it ({tries} subsets tried, "
                      f"at most {MAX_TRIES}): the shares from {who} are inconsistent")
