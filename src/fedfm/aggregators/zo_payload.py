"""``non_state_payload``: lets a learner whose payload is not a delta State (FedKSeed's
seed/scalar pairs, FedBPT's search distribution) pass through the server pipeline.

The algorithm hands the aggregation rule ``{name: payload[name] for name in model}``, so a
payload without the model's names cannot reach the server half that understands it. This
step (stage ``updates``, listed first in ``server_steps``) gives every such update a zero
delta over the trainable State (one shared set of zero tensors) and its example count as
the payload entry ``zo.weight``; the rule then combines zeros, and the learner's server
half (``aggregators/fedkseed.py``, ``aggregators/fedbpt.py``) reads the real entries and
the weights and returns the pseudo-gradient itself. Updates that already carry the model's
names pass unchanged. It is a stand-in until the algorithm lets a server half turn its own
payloads into deltas (docs/zeroth_order.md, "What the round loop needs").
"""

from __future__ import annotations

import torch

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.protocols import RoundContext
from fedfm.core.types import State, Update

WEIGHT = "zo.weight"


def weights_of(payloads) -> list[float]:
    """The example counts carried by ``non_state_payload``; a clear error without them."""
    out = []
    for i, p in enumerate(payloads):
        if WEIGHT not in p:
            raise ValueError(
                f"payload {i} has no '{WEIGHT}': list {{name: non_state_payload}} first in server_steps"
            )
        out.append(float(p[WEIGHT].reshape(-1)[0]))
    return out


class NonStatePayload:
    name = "non_state_payload"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params=None):
        pass

    def __call__(self, value: list[Update], ctx: RoundContext, state: State):
        if ctx.workbench is None:
            raise ValueError("non_state_payload needs the workbench (the trainable State's shapes) in the round context")
        template = ctx.workbench.template
        zeros = {k: torch.zeros_like(v) for k, v in template.items()}
        out = []
        for u in value:
            if set(template) <= set(u.payload):
                out.append(u)
                continue
            payload = {**zeros, **u.payload, WEIGHT: torch.tensor([float(u.num_examples)], dtype=torch.float64)}
            out.append(Update(u.cid, payload, u.num_examples, u.metrics, u.meta))
        return out, {}, {}


register_server_step("non_state_payload", NonStatePayload)
