"""FLASH's client half (Babakniya et al. 2023, "Revisiting Sparsity Hunting in Federated
Learning: Why does Sparsity Consensus Matter?", TMLR): one shared sparse mask, found at the
start from what the clients' sparse training prefers, then fixed for the whole run (SPDST)
or re-picked during training (JMWST).

The discovery round is the one whose instruction says so (``Instruction.config["discover"]``;
the server's schedule, ``aggregators/flash.py``, makes it the first round it aggregates,
round 1 unless that round aggregated nothing; the client never reads the round number).
In it the client trains the model pruned by the server's initial mask (uniform random,
``density`` in every weight) with dynamic sparse training: ``updates`` times during its
local steps (evenly spaced; one, at the middle, by default: FLASH's choice for one local
epoch) it prunes a share of each weight's kept entries by magnitude and grows as many back
where the gradient is largest, over all weights together, so density moves between weights
(``peft/pruning.prune_and_regrow``). The share is ``prune_rate`` annealed over the local
steps as FLASH's sparse training does (the sparse-learning library's cosine decay, stepped
once per batch): after local step ``s`` of ``T`` it is
``prune_rate * (1 + cos(pi (s + 1) / T)) / 2``, so FLASH's one update at the middle prunes
about half of ``prune_rate``; ``prune_rate_decay: constant`` uses ``prune_rate`` itself.
It sends its final masks (``flash_mask.<name>``, packed bits), not its weights: FLASH discards the discovery round's training. (An entry
pruned mid-round still has AdamW moments, which would move it; the client sets every
pruned entry back to zero after each backward pass of the discovery round.) Later
rounds train the pruned model on the server's fixed masks and send the delta
(``learners/masked.py``).

With ``variant: jmwst`` (FLASH's joint mask-weight sparse training), a client keeps
training that way in the rounds the server names (``regrow``: every ``update_every``-th
round after the discovery round) and sends its delta and its final masks; the server picks the next
mask from the aggregate (``aggregators/flash.py``). The delta of an entry the client
pruned is ``-w`` (its model is sparse), of an entry it grew its trained value.

Metrics: ``density`` (of the masks trained, or discovered), ``discovery``, ``regrow``.

Differences from FLASH, said here and in docs/compression.md: FLASH's clients run the
sparse-learning library's prune-and-regrow (Dettmers and Zettlemoyer 2019), whose
redistribution between layers follows the momentum; here regrowth by gradient magnitude
(RigL's criterion), ranked over all weights, moves the density.

Hetero-FLASH (per-client densities from ``federation.roles[].profile``): after discovery
the server sends a smaller client a nested sub-mask of its mask
(``aggregators/nested_masks.py``), which the client trains (and, in a JMWST round, prunes
and regrows at its own density) like any mask. Refused at config
time with PruneFL (``learners/masked.pruning_config_problems``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.loop import planned_steps
from fedfm.learners.masked import PrunableParams, received_masks, train_masked
from fedfm.peft.pruning import density, pack_mask, prune_and_regrow

GROUP = "flash.mask"
FOUND = "flash_mask."


class FlashParams(PrunableParams):
    density: float = Field(0.1, gt=0, le=1, description="target share of prunable entries kept")
    prune_rate: float = Field(0.5, gt=0, lt=1, description="share of kept entries pruned and regrown at each discovery update")
    updates: int = Field(1, ge=1, description="prune-and-regrow updates during a client's discovery round")
    mask_seed: int = Field(0, ge=0, description="seed of the initial and the final random masks")
    pick: Literal["random", "magnitude"] = Field(
        "random", description="which entries of each weight the fixed mask keeps: random (SPDST) or largest |w|")
    variant: Literal["spdst", "jmwst"] = Field(
        "spdst", description="spdst: the mask stays fixed after discovery; jmwst: clients keep pruning and regrowing, "
                             "and the server re-picks the mask from the aggregate every update_every rounds")
    update_every: int = Field(1, ge=1, description="jmwst: rounds r counted after the discovery round with "
                                                    "r % update_every == 0 update the mask")
    prune_rate_decay: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: the rate at local step s of T is prune_rate * (1 + cos(pi (s+1) / T)) / 2, "
                              "as FLASH's sparse training anneals it; constant: prune_rate at every update")


def rate_at(params: FlashParams, step: int, total: int) -> float:
    """The prune rate of an update after local step ``step`` (0-based) of ``total``."""
    if params.prune_rate_decay == "constant":
        return params.prune_rate
    return params.prune_rate * (1.0 + math.cos(math.pi * (step + 1) / max(total, 1))) / 2.0


def update_steps(total: int, updates: int) -> set[int]:
    """The local steps (0-based) after whose backward pass the masks are updated."""
    return {total * j // (updates + 1) for j in range(1, updates + 1)}


class FlashLearner:
    def __init__(self, params: FlashParams | None = None):
        self.params = params or FlashParams()

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        masks = received_masks(instruction, ctx, GROUP)
        discover = bool(instruction.config.get("discover", False))
        regrow = bool(instruction.config.get("regrow", False))
        total = planned_steps(len(ctx.examples), ctx.train)
        due = update_steps(total, self.params.updates)

        def discovery(step: int, params, masks) -> None:
            if step in due:
                grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
                prune_and_regrow(params, grads, masks, rate_at(self.params, step, total))
            with torch.no_grad():  # AdamW's moments move an entry pruned mid-round: back to zero
                for n, p in params.items():
                    p.mul_(masks[n])

        delta, metrics = train_masked(instruction, ctx, masks, discovery if discover or regrow else None)
        found = {FOUND + n: pack_mask(m.cpu()) for n, m in masks.items()}
        payload = found if discover else {**delta, **found} if regrow else delta
        metrics.update(density=density(masks), discovery=float(discover), regrow=float(regrow))
        return Update(cid=ctx.cid, payload=payload, num_examples=len(ctx.examples), metrics=metrics)


register_learner("flash", FlashLearner, FlashParams)
