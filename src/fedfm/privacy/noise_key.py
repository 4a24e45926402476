"""Where the randomness of DP noise comes from: the config's seed, or a secret noise key.

Every DP draw of fedfm (the central noise of ``dp_noise``, the count noise of adaptive
``dp_clip``, a client's share in ``dp_client_noise``, DP-SGD's noise and Poisson batches)
asks this module for its source:

- **seeded** (``FEDFM_DP_NOISE_KEY`` not set): the torch generator the caller seeds from
  the config's ``seed`` (and round, client, tag), exactly the draws of earlier versions.
  Anyone who has the config can regenerate the noise and subtract it: from a released
  model, from metrics.jsonl, or, for a client's share of distributed DP, the server from
  that client's update or from the secure-aggregation sum. Simulation only: no
  protection against whoever knows the config.
- **keyed** (``FEDFM_DP_NOISE_KEY`` set in the environment of the party that draws: the
  server process for central noise, each client node for its share or its DP-SGD): the
  draws come from the ChaCha20 keystream under the key HMAC-SHA256(noise key, purpose
  and the tags of the draw: seed, round, client), as the seeded path uses them. The same
  key gives the same draws, so a keyed run is reproducible and a resumed run bit-identical
  with the same key; without the key the noise cannot be regenerated. The same key and
  the same seed give the same noise in two runs: use a fresh key for every run whose
  output is released (two runs differing in one client's data would otherwise share
  their noise, and their difference would carry none).

Why not a torch generator seeded from the HMAC: torch's CPU generator keeps only the low
32 bits of its seed (``manual_seed(s)`` and ``manual_seed(s + 2**32)`` draw the same), so
2^32 candidate streams could be tried against a released model. The keystream carries
the HMAC's full 256 bits. Normals are drawn by Box-Muller in float64 from 53-bit
uniforms (tails cut at 8.6 standard deviations, probability below 1e-17); like the
seeded path, this is a floating-point Gaussian, not hardened against attacks on the
sampler's floating-point representation.

The key is read from the environment only (never the config or the command line), at
each draw; an empty key, or one shorter than 16 bytes, is refused with an error naming
the variable. A run records which source it used as the ``noise`` metric of its DP
steps ("seeded" or "keyed"; "mixed" when only some clients' shares were keyed).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
from typing import Protocol, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

ENV = "FEDFM_DP_NOISE_KEY"
MIN_KEY_BYTES = 16
CHUNK = 1 << 20  # Box-Muller pairs per keystream read: bounds the memory of a large tensor
KEYED, SEEDED = "keyed", "seeded"


class NoiseSource(Protocol):
    kind: str

    def normal(self, shape: Sequence[int]) -> torch.Tensor: ...  # float64 N(0, 1)

    def uniform(self, n: int) -> torch.Tensor: ...  # n draws in [0, 1)


def key_problem() -> str | None:
    """Why ``FEDFM_DP_NOISE_KEY`` cannot be used, or None (unset is fine: seeded)."""
    raw = os.environ.get(ENV)
    if raw is None:
        return None
    if not raw.strip():
        return f"{ENV} is set but empty: unset it (noise seeded from the config) or set a secret of at least {MIN_KEY_BYTES} bytes"
    if len(raw.encode()) < MIN_KEY_BYTES:
        return (f"{ENV} has {len(raw.encode())} bytes, fewer than {MIN_KEY_BYTES}: a short key can be guessed; "
                "e.g. python -c 'import secrets; print(secrets.token_hex(32))'")
    return None


def read_key() -> bytes | None:
    """The noise key of this process, or None when ``FEDFM_DP_NOISE_KEY`` is not set."""
    problem = key_problem()
    if problem is not None:
        raise ValueError(problem)
    raw = os.environ.get(ENV)
    return None if raw is None else raw.encode()


def mode() -> str:
    """"keyed" or "seeded": where this process's DP draws come from."""
    return SEEDED if read_key() is None else KEYED


def derived_key(key: bytes, purpose: str, tags: Sequence[int]) -> bytes:
    """HMAC-SHA256(key, purpose | tags): the 32-byte ChaCha20 key of one stream of draws."""
    msg = purpose.encode() + b"\0" + b"".join(struct.pack(">q", int(t)) for t in tags)
    return hmac.new(key, b"fedfm-dp-noise/" + msg, hashlib.sha256).digest()


class SeededSource:
    """Today's draws: ``torch.randn`` / ``torch.rand`` of a generator seeded from the config."""

    kind = SEEDED

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float64)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)


class KeyedSource:
    """Draws from the ChaCha20 keystream under ``derived_key(key, purpose, tags)``."""

    kind = KEYED

    def __init__(self, key: bytes, purpose: str, tags: Sequence[int]):
        self._stream = Cipher(algorithms.ChaCha20(derived_key(key, purpose, tags), b"\0" * 16), mode=None).encryptor()

    def _uniform53(self, n: int) -> np.ndarray:
        words = np.frombuffer(self._stream.update(b"\0" * (8 * n)), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53  # in [0, 1), 53 random bits each

    def uniform(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self._uniform53(n))

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        n = math.prod(shape)
        parts, left = [], n
        while left > 0:
            pairs = min(CHUNK, (left + 1) // 2)
            u = self._uniform53(2 * pairs)
            r = np.sqrt(-2.0 * np.log1p(-u[0::2]))  # 1 - u in (0, 1]: log is finite
            z = np.empty(2 * pairs)
            z[0::2], z[1::2] = r * np.cos(2 * np.pi * u[1::2]), r * np.sin(2 * np.pi * u[1::2])
            parts.append(z[: min(left, 2 * pairs)])
            left -= len(parts[-1])
        flat = np.concatenate(parts) if parts else np.zeros(0)
        return torch.from_numpy(flat).reshape(tuple(shape))


def source(purpose: str, tags: Sequence[int], seeded: torch.Generator) -> NoiseSource:
    """The source of one stream of DP draws: keyed by this process's noise key and
    (purpose, tags) when ``FEDFM_DP_NOISE_KEY`` is set, else ``seeded`` as before."""
    key = read_key()
    return SeededSource(seeded) if key is None else KeyedSource(key, purpose, tags)


def summarize(flags: Sequence[float | None]) -> str:
    """The ``noise`` metric of a round from the clients' keyed flags (1.0 keyed; 0.0 or
    missing, seeded): "keyed", "seeded" or "mixed"."""
    keyed = sum(1 for f in flags if f == 1.0)
    return KEYED if flags and keyed == len(flags) else SEEDED if keyed == 0 else "mixed"


__all__ = ["ENV", "KeyedSource", "NoiseSource", "SeededSource", "derived_key", "key_problem", "mode", "read_key",
           "source", "summarize"]
