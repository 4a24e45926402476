"""PruneFL's client half (Jiang et al. 2023, "Model Pruning Enables Efficient Federated
Learning on Edge Devices", IEEE TNNLS): train the pruned model, and in a reconfiguration
round also report every prunable entry's squared gradients.

The instruction carries the shared State and the current masks (``prunefl.mask``, one bit
per entry of each prunable weight, ``peft/pruning.py``); the client trains the pruned
model and sends its delta, zero at every pruned entry (``learners/masked.py``). When the
instruction asks for ``importance`` (a reconfiguration round), the payload also holds, for
each prunable weight, the sum over its local steps of the squared minibatch gradient of
every entry, pruned entries included (``prunefl_g2.<name>``): the ``g_j^2`` the server
ranks (``aggregators/prunefl.py``). The gradient of a pruned entry exists because the
weight is a dense tensor whose zeros are values, not removed structure.

Metrics: ``density`` (entries kept over prunable entries, in the mask trained) and
``importance`` (1 in a reconfiguration round).

Refused at config time (``learners/masked.pruning_config_problems``): a server optimizer
other than ``sgd`` at lr 1, and ``peft.method`` other than ``full``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.masked import PrunableParams, received_masks, train_masked
from fedfm.peft.pruning import density

GROUP = "prunefl.mask"
G2 = "prunefl_g2."


class PruneFLParams(PrunableParams):
    initial_density: float = Field(1.0, gt=0, le=1, description="share of each prunable weight kept at the start, by magnitude")
    reconfigure_every: int = Field(1, ge=1, description="rounds r with r % reconfigure_every == 0 reconfigure the mask")
    reconfigure_until: int | None = Field(None, ge=1, description="the last round that reconfigures (None: never stop)")
    fixed_s: float = Field(10.0, gt=0, description="PruneFL's c: seconds of a round that do not scale with the entries kept")
    per_value_s: float = Field(1e-6, gt=0, description="PruneFL's t_j: seconds a round spends per kept entry (its bytes on the wire)")

    def reconfigures(self, rnd: int) -> bool:
        """Whether round ``rnd``'s updates (rounds count from 1, as in metrics.jsonl) set the
        masks of the rounds after it."""
        due = rnd % self.reconfigure_every == 0
        return due and (self.reconfigure_until is None or rnd <= self.reconfigure_until)


class PruneFLLearner:
    def __init__(self, params: PruneFLParams | None = None):
        self.params = params or PruneFLParams()

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        masks = received_masks(instruction, ctx, GROUP)
        importance = bool(instruction.config.get("importance", False))
        g2 = {n: torch.zeros(m.shape, dtype=torch.float32, device=m.device) for n, m in masks.items()} if importance else None

        def square_sums(step: int, params, masks) -> None:
            for name, p in params.items():
                if p.grad is not None:
                    g2[name] += p.grad.detach().float() ** 2

        payload, metrics = train_masked(instruction, ctx, masks, square_sums if importance else None)
        if g2 is not None:
            payload.update({G2 + n: t.cpu() for n, t in g2.items()})
        metrics.update(density=density(masks), importance=float(importance))
        return Update(cid=ctx.cid, payload=payload, num_examples=len(ctx.examples), metrics=metrics)


register_learner("prunefl", PruneFLLearner, PruneFLParams)
