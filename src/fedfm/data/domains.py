"""Clients that each hold one domain: the ``by_domain`` partitioner.

Multi-domain methods (FedAPT, Su et al. 2024; DiPrompT, Bai et al. 2024) start from
clients whose data come from different domains. ``federation.partitioner: {name:
by_domain, sep: ":"}`` reads a row's domain as the prefix of its group before ``sep``
(``politics`` writes groups ``<corpus>:<speaker>``), sorts the D domain names, gives
client ``i`` domain ``i mod D`` and shares each domain's groups (whole groups, largest
first, each to the currently smallest of that domain's clients) among its clients. A
client's domain index is therefore ``cid mod D`` (write it into the roles' profiles, e.g.
``profile: {domain: 0}``, for learners that read it).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedfm.data.partition import register_partitioner


class ByDomainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sep: str = Field(":", min_length=1, description="a group's domain is its name up to the first sep")


def domain_names(groups: np.ndarray, sep: str) -> np.ndarray:
    return np.array([str(g).split(sep, 1)[0] for g in groups])


def by_domain(labels, groups, n, rng, params: ByDomainParams) -> list[np.ndarray]:
    if groups is None:
        raise ValueError("federation.partitioner 'by_domain' needs a group column '<domain><sep><owner>' (data.group_column)")
    groups = np.asarray(groups)
    domains = domain_names(groups, params.sep)
    names = sorted(set(domains.tolist()))
    if n < len(names):
        raise ValueError(f"federation.clients={n} is fewer than the {len(names)} domains {names} of the by_domain partitioner")
    parts: list[list[int]] = [[] for _ in range(n)]
    for d, name in enumerate(names):
        mine = list(range(d, n, len(names)))
        owners = rng.permutation(np.unique(groups[domains == name]))
        members = {g: np.flatnonzero(groups == g) for g in owners}
        if len(owners) < len(mine):
            raise ValueError(f"by_domain: domain '{name}' has {len(owners)} groups left for its {len(mine)} clients")
        for g in sorted(owners, key=lambda g: -len(members[g])):
            k = min(mine, key=lambda i: (len(parts[i]), i))
            parts[k].extend(members[g].tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


register_partitioner("by_domain", by_domain, ByDomainParams)
