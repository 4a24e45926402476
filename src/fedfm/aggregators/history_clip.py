"""``history_clip``: ClippedClustering's adaptive clipping (Li, Ngai and Voigt 2023, "An
Experimental Study of Byzantine-Robust Aggregation Schemes in Federated Learning", IEEE
Transactions on Big Data), a server step at stage ``updates``.

Every update is scaled to an L2 norm of at most ``tau``, the median of the norms of all
the updates the server has received so far, this round's included (numpy's median: the
mean of the two middle ones). The norms are the step's state (``norms``, float64,
checkpointed; a round whose aggregation is not applied does not add its norms), so a
resumed run clips as the uninterrupted one. The paper's ClippedClustering is this step
followed by the clustering rule without its own clipping:

    aggregator: {rule: clipped_clustering, clip: none}
    server_steps: [{name: history_clip}]

(``clipped_clustering``'s default, ``clip: round``, clips to the median of this round's
norms only; the two together would clip twice and are refused at config time.) With any
other rule it is a norm bound that adapts to the updates seen. Metrics: ``tau``,
``clipped`` (updates scaled this round), ``seen`` (norms in the history).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fedfm.aggregators.clip import clip_payload, l2_norm
from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.types import State, Update


class HistoryClip:
    name = "history_clip"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params=None):
        pass

    def __call__(self, updates: list[Update], ctx, state: State):
        if not updates:
            return updates, state, {}
        norms = [l2_norm(u.payload) for u in updates]
        seen = torch.cat([state.get("norms", torch.zeros(0, dtype=torch.float64)), torch.tensor(norms, dtype=torch.float64)])
        tau = float(np.median(seen.numpy()))
        out, clipped = [], 0
        for u, norm in zip(updates, norms):
            if norm > tau:
                payload, _ = clip_payload(u.payload, tau)
                u, clipped = replace(u, payload=payload), clipped + 1
            out.append(u)
        return out, {"norms": seen}, {"tau": tau, "clipped": clipped, "seen": int(seen.numel())}


register_server_step("history_clip", HistoryClip)
