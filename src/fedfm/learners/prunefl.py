"""PruneFL's client half (Jiang et al. 2023, "Model Pruning Enables Efficient Federated
Learning on Edge Devices", IEEE TNNLS): train the pruned model, and in a reconfiguration
round also report every prunable entry's squared gradients.

The instruction carries the shared State and the current masks (``prunefl.mask``, one bit
per entry of each prunable weight, ``peft/pruning.py``). The client multiplies each
prunable weight by its mask (pruned entries are exactly zero), trains with the gradients
of pruned entries zeroed after every backward pass (so they stay zero under SGD and AdamW:
a zero gradient gives a zero step, and weight decay keeps a zero at zero), and sends the
delta against the masked weights it received: zero at every pruned entry. When the
instruction asks for ``importance`` (a reconfiguration round), the payload also holds, for
each prunable weight, the sum over its local steps of the squared minibatch gradient of
every entry, pruned entries included (``prunefl_g2.<name>``): the ``g_j^2`` the server
ranks (``aggregators/prunefl.py``). The gradient of a pruned entry exists because the
weight is a dense tensor whose zeros are values, not removed structure.

Metrics: ``density`` (entries kept over prunable entries, in the mask trained) and
``importance`` (1 in a reconfiguration round).

Refused at config time (``prunefl_config_problems``): a server optimizer other than
``sgd`` at lr 1 (PruneFL's server averages; the server zeroes a removed entry through the
delta, exact only when the step adds the delta as it is), and ``peft.method`` other than
``full`` (PruneFL prunes the model's own weights; ``full`` makes them the State).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.loop import train_loop
from fedfm.peft.pruning import density, unpack_mask
from fedfm.peft.state import get_state, set_state

GROUP = "prunefl.mask"
G2 = "prunefl_g2."


class PruneFLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prune: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                             description="fnmatch patterns of the State's 2-D weights that may be pruned (task heads never are)")
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
        packed = instruction.broadcast.get(GROUP)
        if not packed:
            raise ValueError(f"prunefl: the instruction for client {ctx.cid} carries no masks ('{GROUP}')")
        set_state(ctx.model, instruction.state)
        params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        masks = {}
        for name, bits in packed.items():
            if name not in params:
                raise ValueError(f"prunefl: client {ctx.cid} received a mask for '{name}', which is not a trainable weight")
            masks[name] = unpack_mask(bits, params[name]).to(params[name].device)
        with torch.no_grad():
            for name, m in masks.items():
                params[name].mul_(m)
        start = get_state(ctx.model)
        importance = bool(instruction.config.get("importance", False))
        g2 = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in masks} if importance else None

        def mask_gradients() -> None:
            for name, m in masks.items():
                g = params[name].grad
                if g is None:
                    continue
                if g2 is not None:
                    g2[name] += g.detach().float() ** 2
                g.mul_(m)

        metrics = train_loop(ctx, after_backward=mask_gradients)
        trained = get_state(ctx.model)
        payload = {k: trained[k] - start[k] for k in trained}
        if g2 is not None:
            payload.update({G2 + n: t.cpu() for n, t in g2.items()})
        metrics.update(density=density(masks), importance=float(importance))
        return Update(cid=ctx.cid, payload=payload, num_examples=len(ctx.examples), metrics=metrics)


register_learner("prunefl", PruneFLLearner, PruneFLParams)


def prunefl_config_problems(exp) -> list[str]:
    if exp.learner.name != "prunefl":
        return []
    problems = []
    so = exp.server_optimizer
    lr = so.params().get("lr", 1.0)
    if so.name != "sgd" or lr != 1.0:
        problems.append(f"learner prunefl: server_optimizer must be {{name: sgd, lr: 1.0}} (got {so.name}, lr {lr}): "
                        "PruneFL's server averages, and zeroes a removed entry through the delta, exact only when "
                        "the server adds the delta as it is")
    if exp.peft.method != "full":
        problems.append(f"learner prunefl prunes the model's own weights: peft.method must be full (got {exp.peft.method})")
    return problems
