"""Client halves of HetLoRA and FlexLoRA: train a rank-``r`` LoRA view inside the one
``r_max`` model.

HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models"): client k trains LoRA of its own rank ``r_k``, starting from the
global factors truncated to ``r_k``. Rank self-pruning (``prune: true``): the local loss
gains ``lam * sum_modules ||B[:, j:r] A[j:r, :]||_F`` with ``j = max(1, floor(gamma * r))``,
the norm of the module's last components; when local training lowered that norm, the
client prunes its rank to ``j``: the pruned components are set to zero in what it sends,
and it reports ``hetlora_rank = j``, which the server keeps and uses from then on
(``aggregators/hetlora.py``). Our reading of the paper; ``gamma`` and ``lam`` are its
decay factor and regularization weight. "Lowered" compares with the tail norm of the
factors received this round, so pruning needs a non-zero received tail: it never fires in
round 1 (peft initialises B = 0, so every ``B A`` is 0 and no norm can fall below it), nor
in any round whose received ``B[:, j:r] A[j:r, :]`` is zero; it can from round 2 on, once
the aggregated B is non-zero. (A norm stored from the client's previous round would not
help round 1, which has none, and would compare with factors the server has since
replaced by the aggregate.)

FlexLoRA (Bai et al. 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources"): the same local training at the client's rank,
without pruning; the server half (``aggregators/flexlora.py``) aggregates full-size
``B A`` and redistributes by SVD.

The one base model carries LoRA at ``r_max`` (``peft.r``). The received factors (rank
``r_wire``, the tier's rank) are zero-padded to ``r_max`` and every component at index
``>= r`` has its gradient masked to zero (``peft/hetero.rank_grad_mask``), so those
components stay exactly zero and the model computes exactly the client's rank-``r`` LoRA
(one scaling ``alpha / r_max`` for every rank). In simulation the masked components are
still in the forward and backward passes: the per-step time measured here (``step_s``)
is the ``r_max`` model's; a phone's real cost is scaled by its profile ``speed`` in the
simulated clock (``runtime/capacity.py``).

Metrics: ``steps``, ``step_s`` (measured wall seconds per local step), ``bytes_down``
(tensor bytes of what the client received), ``rank`` (the rank it trained) and, with
pruning, ``hetlora_rank`` (its rank from now on).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.types import Instruction, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.loop import train_loop
from fedfm.peft.hetero import is_lora_a, is_lora_b, lora_pairs, lora_rank, pad, rank_grad_mask, truncate
from fedfm.peft.state import get_state, set_state


class FlexLoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HetLoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prune: bool = Field(False, description="local rank self-pruning with the tail-norm regularizer")
    gamma: float = Field(0.5, gt=0, lt=1, description="pruning keeps max(1, floor(gamma * r)) components")
    lam: float = Field(1e-3, ge=0, description="weight of the tail-norm regularizer")
    weighting: Literal["sparsity", "examples"] = Field(
        "sparsity",
        description="server: weight each client's padded module by ||B_k A_k||_F (the paper's) or by examples",
    )


def state_bytes(*states: State) -> int:
    return sum(t.numel() * t.element_size() for s in states for t in s.values())


def model_rank(model: torch.nn.Module) -> int:
    ranks = {int(p.shape[0]) for n, p in model.named_parameters() if p.requires_grad and is_lora_a(n)}
    if len(ranks) != 1:
        raise ValueError(f"heterogeneous-rank learners need peft.method lora with one rank, found ranks {sorted(ranks)}")
    return ranks.pop()


def tail_start(rank: int, gamma: float) -> int:
    """First pruned component: max(1, floor(gamma * rank))."""
    return max(1, math.floor(gamma * rank))


def tail_norm(factors: dict[str, torch.Tensor], start: int, rank: int) -> torch.Tensor:
    """sum over modules of ||B[:, start:rank] A[start:rank, :]||_F (differentiable)."""
    total = None
    for _, (a, b) in lora_pairs(factors).items():
        prod = factors[b][:, start:rank] @ factors[a][start:rank, :]  # (out, in)
        norm = torch.linalg.matrix_norm(prod)
        total = norm if total is None else total + norm
    return total if total is not None else torch.zeros(())


def timed_train(ctx: LocalContext, **hooks) -> dict[str, float]:
    t0 = time.perf_counter()
    metrics = train_loop(ctx, **hooks)
    metrics["step_s"] = (time.perf_counter() - t0) / max(metrics["steps"], 1.0)
    return metrics


class HetRankLearner:
    """Local training at the rank of the received factors (or ``config["rank"]``); with
    ``prune``, HetLoRA's rank self-pruning (FlexLoRA's clients never prune)."""

    def __init__(self, prune: bool = False, gamma: float = 0.5, lam: float = 0.0):
        self.prune, self.gamma, self.lam = prune, gamma, lam

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        received = instruction.state
        r_max, r_wire = model_rank(ctx.model), lora_rank(received)
        rank = int(instruction.config.get("rank", r_wire))
        if not 1 <= rank <= r_wire <= r_max:
            raise ValueError(f"client {ctx.cid}: rank {rank}, received rank {r_wire} and model rank {r_max} must satisfy 1 <= rank <= received <= model")
        set_state(ctx.model, pad(received, r_max))
        params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        factors = {n: p for n, p in params.items() if is_lora_a(n) or is_lora_b(n)}
        start = tail_start(rank, self.gamma)
        pruning = self.prune and start < rank
        extra = (lambda: self.lam * tail_norm(factors, start, rank)) if pruning and self.lam > 0 else None
        with torch.no_grad():
            before = float(tail_norm(factors, start, rank)) if pruning else 0.0
        handles = rank_grad_mask(ctx.model, rank)
        try:
            metrics = timed_train(ctx, extra_loss=extra)
        finally:
            for h in handles:
                h.remove()
        trained = truncate(get_state(ctx.model), r_wire)
        kept = rank
        if pruning:
            with torch.no_grad():
                after = float(tail_norm(factors, start, rank))
            if after < before:
                kept = start
                trained = pad(truncate(trained, kept), r_wire)
            metrics["hetlora_rank"] = float(kept)
        delta = {k: trained[k] - received[k].to(trained[k].dtype) for k in trained}
        metrics.update(rank=float(kept), bytes_down=float(state_bytes(received, *instruction.broadcast.values())))
        return Update(cid=ctx.cid, payload=delta, num_examples=len(ctx.examples), metrics=metrics)


def hetlora_learner(params: HetLoraParams) -> HetRankLearner:
    return HetRankLearner(params.prune, params.gamma, params.lam)


def flexlora_learner(params: FlexLoraParams) -> HetRankLearner:
    return HetRankLearner()


register_learner("hetlora", hetlora_learner, HetLoraParams)
register_learner("flexlora", flexlora_learner, FlexLoraParams)
