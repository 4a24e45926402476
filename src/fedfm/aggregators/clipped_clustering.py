"""ClippedClustering (Li, Ngai and Voigt 2023, "An Experimental Study of Byzantine-Robust
Aggregation Schemes in Federated Learning", IEEE Transactions on Big Data).

1. Clip: every update is scaled to an L2 norm of at most ``tau``, the median of the update
   norms;
2. cluster: agglomerative clustering with average linkage on the pairwise cosine
   distances of the clipped updates, cut into two clusters (``scipy.cluster.hierarchy``);
3. aggregate: the unweighted mean of the clipped updates of the larger cluster (on a tie,
   the cluster holding the lowest client position).

``tau``: in the paper, the median of the norms of *all* updates seen so far, a history
kept across rounds. A rule is a pure function of one round, so the rule alone
(``clip: round``, the default) clips to the median of this round's norms: "ClippedClustering
with a per-round tau". The paper's rule is the server step ``history_clip``
(``aggregators/history_clip.py``, which keeps the norms) followed by this rule with
``clip: none``:

    aggregator: {rule: clipped_clustering, clip: none}
    server_steps: [{name: history_clip}]

``space: lora_product`` computes the cosine distances on LoRA's effective weight changes
(``aggregators/lora_space.py``); the clipping and the mean are always on the sent
coordinates.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.base import register_aggregator
from fedfm.aggregators.flat import Space, stack, unstack
from fedfm.core.types import State


class ClippedClusteringParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    space: Space = Field("coordinates", description="cosine distances on the sent coordinates or on LoRA's product B@A")
    clip: Literal["round", "none"] = Field(
        "round", description="round: clip to the median of this round's norms; none: the updates come clipped "
        "(server step history_clip: the paper's median of every norm seen)")


def clip_rows(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Rows scaled to norm <= the median row norm (numpy's median: the mean of the two middle ones)."""
    norms = x.norm(dim=1)
    tau = float(np.median(norms.numpy()))
    scale = torch.where(norms > tau, tau / norms.clamp_min(1e-30), torch.ones_like(norms))
    return x * scale[:, None], tau


def cosine_distances(x: torch.Tensor) -> np.ndarray:
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    d = (1.0 - unit @ unit.T).clamp_min(0).numpy()
    np.fill_diagonal(d, 0.0)
    return (d + d.T) / 2


def larger_cluster(dist: np.ndarray) -> list[int]:
    """Indices of the larger of the two average-linkage clusters."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = dist.shape[0]
    if n <= 2:
        return list(range(n))
    labels = fcluster(linkage(squareform(dist, checks=False), method="average"), t=2, criterion="maxclust")
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        groups.setdefault(lab, []).append(i)
    return max(groups.values(), key=lambda g: (len(g), -g[0]))


def clipped_clustering(state: State, deltas: Sequence[State], weights: Sequence[float], params: ClippedClusteringParams) -> State:
    x = stack(state, deltas)
    clipped = clip_rows(x)[0] if params.clip == "round" else x
    if params.space == "coordinates":
        measured = clipped
    else:
        from fedfm.aggregators.lora_space import product_rows

        scaled = [unstack(state, row) for row in clipped]
        measured = product_rows(state, scaled)
    chosen = larger_cluster(cosine_distances(measured))
    return unstack(state, clipped[chosen].mean(0))


register_aggregator("clipped_clustering", clipped_clustering, ClippedClusteringParams)
