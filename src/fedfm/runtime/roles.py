"""Client roles and profiles from the config (``federation.roles``).

Each role takes ``cids`` (explicit), ``count`` or ``fraction`` (``round(fraction *
clients)``, at least 1) of the clients. Explicit ids are placed first; the others are
drawn, role after role in config order, from a permutation of the remaining clients
seeded by the experiment's seed alone, so the server and every client compute the same
assignment without a message. A client gets at most one role; clients without one have
role ``default``. ``ClientSpec.profile`` becomes ``{"role": name, **role.profile}``.
"""

from __future__ import annotations

import numpy as np

from fedfm.core.seeding import derive_seed

ROLE_TAG = 0x201E
DEFAULT = "default"


def role_sizes(roles, n_clients: int) -> list[int]:
    sizes = []
    for r in roles:
        if r.cids is not None:
            sizes.append(len(r.cids))
        elif r.count is not None:
            sizes.append(r.count)
        else:
            sizes.append(max(1, int(round(r.fraction * n_clients))))
    return sizes


def check_roles(roles, n_clients: int) -> str | None:
    """A reason the roles cannot be assigned, or None."""
    taken: dict[int, str] = {}
    for r in roles:
        for c in r.cids or []:
            if c in taken:
                return f"client {c} is in roles '{taken[c]}' and '{r.name}'"
            taken[c] = r.name
    total = sum(role_sizes(roles, n_clients))
    if total > n_clients:
        detail = ", ".join(f"{r.name}: {s}" for r, s in zip(roles, role_sizes(roles, n_clients)))
        return f"roles need {total} clients ({detail}) but federation.clients is {n_clients}"
    return None


def assign_roles(roles, n_clients: int, seed: int) -> dict[int, str]:
    """client id -> role name (``default`` for clients without one)."""
    reason = check_roles(roles, n_clients)
    if reason is not None:
        raise ValueError(f"federation.roles: {reason}")
    out = {c: DEFAULT for c in range(n_clients)}
    for r in roles:
        for c in r.cids or []:
            out[c] = r.name
    free = [c for c in np.random.default_rng(derive_seed(seed, ROLE_TAG)).permutation(n_clients).tolist() if out[c] == DEFAULT]
    sizes = role_sizes(roles, n_clients)
    for r, size in zip(roles, sizes):
        if r.cids is not None:
            continue
        for c in free[:size]:
            out[c] = r.name
        free = free[size:]
    return out


def apply_profiles(clients, roles, seed: int) -> None:
    """Fill every ``ClientSpec.profile`` (in place) from the roles."""
    by_name = {r.name: r for r in roles}
    assignment = assign_roles(roles, len(clients), seed)
    for c in clients:
        name = assignment[c.cid]
        extra = dict(by_name[name].profile) if name in by_name else {}
        c.profile = {**c.profile, **extra, "role": name}
