"""Client clustering as small pure functions: IFCA's choice, update-similarity clustering,
and purity against known groups.

- ``ifca_choice``: IFCA (Ghosh et al. 2020, "An Efficient Framework for Clustered
  Federated Learning", Algorithm 1): a client estimates its cluster as the index of the
  model with the lowest loss on its own data (the lowest index on a tie).
- ``cluster_updates``: clustering of clients by the similarity of their (LoRA) updates
  after a warm-up, the idea of FL-TAC (Ping et al. 2024, "FL-TAC: Enhanced Fine-Tuning in
  Federated Learning via Low-Rank, Task-Specific Adapter Clustering"): spherical k-means
  (cosine similarity) on the flattened updates, with a deterministic farthest-point start,
  so the same updates always give the same clusters. FL-TAC clusters task-specific
  adapters with k-means; this is that clustering step (FL-TAC-inspired: cosine, not
  Euclidean), used by the ``cluster_report`` step and by the ``update_clusters`` learner
  (``personalize/update_clusters.py``), which serves a model per cluster.
  ``spherical_kmeans_fit`` also returns the unit centres; ``nearest_centre`` assigns a new
  vector to the most similar centre; ``align_labels`` matches a new clustering to the old
  cluster indices (scipy's Hungarian method) so indices stay stable across re-clusterings. Clusters *given* by the data (a language family, as in FedLFC, Guo et
  al. 2024b, "FedLFC: Towards Efficient Federated Multilingual Modeling with LoRA-based
  Language Family Clustering") come from the client's profile instead (``personalize/ifca.py``).
- ``purity``: the fraction of clients whose cluster's majority group is their own group.

Written by hand: a few lines of k-means over a handful of vectors, where scikit-learn's
KMeans would add a dependency, random restarts and Euclidean (not cosine) geometry.
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch

from fedfm.core.types import State


def ifca_choice(losses: Sequence[float]) -> int:
    """argmin_j losses[j], the lowest j on ties; a NaN loss is never chosen."""
    if not losses:
        raise ValueError("ifca_choice: no losses (k must be at least 1)")
    best, best_loss = 0, float("inf")
    for j, loss in enumerate(losses):
        if loss == loss and loss < best_loss:  # skips NaN
            best, best_loss = j, float(loss)
    return best


def flatten(payload: State, names: Sequence[str] | None = None) -> torch.Tensor:
    """One float64 vector of the named tensors (sorted names by default)."""
    keys = sorted(payload) if names is None else list(names)
    return torch.cat([payload[k].reshape(-1).double() for k in keys])


def spherical_kmeans_fit(x: torch.Tensor, k: int, iters: int = 50) -> tuple[list[int], torch.Tensor]:
    """Cluster the rows of ``x`` (n, d) by cosine similarity into ``k`` clusters:
    (labels, unit centres (k, d)).

    Start: row 0 is the first centre; each next centre is the row least similar to its
    nearest centre so far (farthest point). Then Lloyd iterations on the unit sphere:
    assign each row to the most similar centre (lowest index on ties), centre <- normalised
    mean of its rows (an empty cluster keeps its centre).
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cluster_updates: k={k} must be between 1 and the number of updates ({n})")
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n, d)
    centres = [0]
    while len(centres) < k:
        sim = (unit @ unit[centres].T).max(dim=1).values  # (n,)
        sim[centres] = float("inf")
        centres.append(int(torch.argmin(sim)))
    c = unit[centres].clone()  # (k, d)
    labels: list[int] = []
    for _ in range(iters):
        new = torch.argmax(unit @ c.T, dim=1).tolist()  # (n,) first max on ties
        if new == labels:
            break
        labels = new
        for j in range(k):
            members = [i for i, lab in enumerate(labels) if lab == j]
            if members:
                mean = unit[members].mean(0)
                c[j] = mean / mean.norm().clamp_min(1e-12)
    return labels, c


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 50) -> list[int]:
    """The labels of ``spherical_kmeans_fit``."""
    return spherical_kmeans_fit(x, k, iters)[0]


def nearest_centre(v: torch.Tensor, centres: torch.Tensor) -> int:
    """Index of the centre (rows of ``centres``, unit) most similar in cosine to ``v``
    (the lowest index on ties)."""
    unit = v.double() / v.double().norm().clamp_min(1e-12)
    return int(torch.argmax(centres.double() @ unit))


def align_labels(new: Sequence[int], old: Sequence[int], k: int) -> list[int]:
    """``perm`` with ``perm[new label]`` = the old cluster index it continues: the matching
    of new clusters to old indices that keeps the most clients in their cluster (Hungarian
    method on the k x k overlap counts; old label -1 = no cluster yet, counted nowhere)."""
    from scipy.optimize import linear_sum_assignment

    overlap = np.zeros((k, k), dtype=np.int64)
    for a, b in zip(new, old):
        if b >= 0:
            overlap[a, b] += 1
    rows, cols = linear_sum_assignment(-overlap)
    perm = [0] * k
    for r, c in zip(rows.tolist(), cols.tolist()):
        perm[r] = c
    return perm


def cluster_updates(payloads: Sequence[State], k: int, names: Sequence[str] | None = None) -> list[int]:
    """Cluster index of each update (same order), by cosine similarity of the flattened tensors."""
    if not payloads:
        return []
    keys = sorted(payloads[0]) if names is None else list(names)
    return spherical_kmeans(torch.stack([flatten(p, keys) for p in payloads]), k)


def purity(assign: Mapping[int, int], truth: Mapping[int, Hashable]) -> float:
    """sum over clusters of the size of its most common true group / number of clients
    (clients without a known group are left out)."""
    known = [c for c in assign if c in truth]
    if not known:
        raise ValueError("purity: no assigned client has a known group")
    by_cluster: dict[int, Counter] = {}
    for c in known:
        by_cluster.setdefault(assign[c], Counter())[truth[c]] += 1
    return sum(cnt.most_common(1)[0][1] for cnt in by_cluster.values()) / len(known)


def majority(values: Sequence[Hashable]) -> Hashable:
    """The most common value (the first seen on a tie)."""
    if not values:
        raise ValueError("majority: no values")
    counts = Counter(values)
    top = max(counts.values())
    return next(v for v in values if counts[v] == top)
