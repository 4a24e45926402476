"""Derived seeds: one experiment ``seed`` fixes partitions, sampling, init and noise."""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 31-bit seed from (seed, round, client, ...); stable across runs and processes."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0] >> 1)
