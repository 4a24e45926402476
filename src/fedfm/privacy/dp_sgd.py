"""``dp_sgd``: sample-level DP on the client, on the trainable (PEFT) parameters only.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") applied to the
adapter parameters, as DP-LoRA does (Liu et al. 2023, "Differentially Private Low-Rank
Adaptation of Large Language Model Using Federated Learning"). Per local step:

1. a batch drawn by Poisson sampling: every example of the client joins independently
   with probability q = train.batch_size / (client's examples), which is the sampling the
   RDP accountant assumes (an empty batch is a step too: it releases noise only);
2. the gradient of each example's loss w.r.t. the trainable parameters, clipped to L2
   norm ``clip_norm`` (C) over all of them together;
3. the sum of the clipped gradients plus N(0, sigma^2 C^2) per coordinate, divided by the
   expected batch size q * n (Opacus's fixed denominator), given to the optimizer of
   ``train`` (SGD or AdamW: post-processing). ``train.max_grad_norm`` is not used: the
   per-example clip replaces it.

The one shared base model is used throughout; nothing is copied and no hook is left on it.

Randomness (``privacy/noise_key.py``): the Poisson batches and the noise come from one
stream. Both are secret in Abadi et al.'s model: the amplification by sampling that the
accountant credits assumes nobody knows which examples a step used, so with
``FEDFM_DP_NOISE_KEY`` set in the client node's environment both come from the keystream
under HMAC-SHA256(key, "dp_sgd", client seed, round, client). Without it, both come from a
torch generator seeded from the client's (seed, round, client) seed, as before: anyone
with the config can regenerate the batches and the noise (simulation only). Each update
carries ``dp_sgd.noise_keyed`` (1.0 or 0.0), reported by ``dp_sgd_accountant`` as
``noise`` ("keyed", "seeded" or "mixed" over the round's clients). Dropout masks stay
seeded from the config (they are not part of the mechanism).

Why not Opacus for the per-example gradients: Opacus's ``GradSampleModule`` on the peft
model fails in backward ("No activations detected for Linear", measured with opacus 1.6,
peft 0.21), and ``torch.func.vmap`` over the transformers model fails in its attention
mask code (``padding_mask.all()`` is data-dependent control flow under vmap,
transformers 5.24). So each example's gradient is taken by its own backward pass (a
micro-batch of one): exact and independent of task and tuner, at the cost of B backward
passes per step. Opacus's RDP accountant is used in the tests to check the accounting.

Outside the accounting: the update also carries ``train_loss`` (the mean loss of the
sampled examples), ``examples_seen`` (the total size of the Poisson batches) and
``dp_sgd.clipped_fraction``, exact and in the clear (also under secure aggregation); the
round loop writes the clients' mean ``train_loss`` to metrics.jsonl. None of them is
noised or covered by the reported epsilon (docs/privacy.md, "What epsilon does not cover").

Accounting: each update reports ``dp_sgd.sample_rate``, ``dp_sgd.noise_multiplier`` and
``steps``; the server step ``dp_sgd_accountant`` keeps every client's steps (step state,
checkpointed) and writes each round the worst client's epsilon (``.epsilon_worst``) at its
``delta``, with dp-accounting's RDP accountant (Poisson sampling, add-or-remove-one).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.types import Instruction, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import make_optimizer, planned_steps
from fedfm.peft.state import set_state
from fedfm.privacy import noise_key
from fedfm.privacy.accounting import Plan, epsilon

NOISE_KEYED = "dp_sgd.noise_keyed"  # 1.0 when the client's batches and noise came from its noise key


class DpSgdParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite sigma or norm is refused by name
    clip_norm: float = Field(..., gt=0, description="C: each example's gradient is clipped to this L2 norm")
    noise_multiplier: float = Field(..., ge=0, description="sigma: noise std on the summed gradients over C")


def clip_and_sum(grads: list[list[torch.Tensor]], clip_norm: float) -> tuple[list[torch.Tensor], int]:
    """Sum of the per-example gradients, each scaled to L2 norm <= clip_norm; and how many were clipped."""
    total = [torch.zeros_like(g, dtype=torch.float64) for g in grads[0]] if grads else []
    clipped = 0
    for g in grads:
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        clipped += int(norm > clip_norm)
        for acc, t in zip(total, g):
            acc.add_(t.double(), alpha=scale)
    return total, clipped


class DpSgdLearner:
    def __init__(self, params: DpSgdParams):
        self.p = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        set_state(ctx.model, instruction.state)
        model, cfg, n = ctx.model, ctx.train, len(ctx.examples)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg)
        src = noise_key.source("dp_sgd", (ctx.seed, ctx.round, ctx.cid), torch.Generator().manual_seed(ctx.seed))
        torch.manual_seed(ctx.seed)  # dropout masks
        q = min(1.0, cfg.batch_size / n)
        expected = q * n
        total = planned_steps(n, cfg)
        std = self.p.noise_multiplier * self.p.clip_norm
        model.train()
        loss_sum, seen, clipped = 0.0, 0, 0
        for step in range(1, total + 1):
            chosen = torch.nonzero(src.uniform(n) < q).flatten().tolist()
            grads = []
            for i in chosen:
                loss = ctx.task.loss(model, ctx.task.collate([ctx.examples[i]], ctx.tokenizer))
                g = torch.autograd.grad(loss, params, allow_unused=True)
                grads.append([torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(params, g)])
                loss_sum += loss.item()
            summed, c = clip_and_sum(grads, self.p.clip_norm)
            clipped += c
            if not summed:
                summed = [torch.zeros_like(p, dtype=torch.float64) for p in params]
            for p, s in zip(params, summed):
                noise = src.normal(p.shape) * std
                p.grad = ((s + noise) / expected).to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(chosen)
            if ctx.on_step is not None:
                ctx.on_step(step, total)
        model.eval()
        metrics = {
            "train_loss": loss_sum / max(seen, 1),
            "steps": float(total),
            "examples_seen": float(seen),
            "dp_sgd.sample_rate": q,
            "dp_sgd.noise_multiplier": self.p.noise_multiplier,
            "dp_sgd.clipped_fraction": clipped / max(seen, 1),
            NOISE_KEYED: float(src.kind == noise_key.KEYED),
        }
        return delta_update(instruction, ctx, metrics)


register_learner("dp_sgd", DpSgdLearner, DpSgdParams)


class DpSgdAccountantParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of each client's (epsilon, delta)")


def client_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """A client's epsilon after ``steps`` DP-SGD steps with Poisson rate q (RDP)."""
    if steps == 0:
        return 0.0
    pop = 10**6  # Plan states q as sample_size / population; q is exact to 1e-6
    return epsilon(Plan(pop, max(1, round(q * pop)), sampling="poisson"), [sigma] * steps, delta)


class DpSgdAccountant:
    name = "dp_sgd_accountant"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: DpSgdAccountantParams):
        self.delta = params.delta

    def __call__(self, updates: list[Update], ctx, state: State):
        n = ctx.num_clients
        steps = state.get("steps", torch.zeros(n, dtype=torch.float64)).clone()
        rate = state.get("rate", torch.zeros(n, dtype=torch.float64)).clone()
        sigma = state.get("sigma", torch.zeros(n, dtype=torch.float64)).clone()
        for u in updates:
            q, s = u.metrics.get("dp_sgd.sample_rate"), u.metrics.get("dp_sgd.noise_multiplier")
            if q is None or s is None:
                raise ValueError(f"dp_sgd_accountant: client {u.cid}'s update carries no dp_sgd metrics (learner.name must be dp_sgd)")
            if steps[u.cid] > 0 and (rate[u.cid] != q or sigma[u.cid] != s):
                raise ValueError(f"dp_sgd_accountant: client {u.cid} changed its sampling rate or noise between rounds")
            steps[u.cid] += u.metrics.get("steps", 0.0)
            rate[u.cid], sigma[u.cid] = q, s
        eps = [client_epsilon(float(rate[c]), float(sigma[c]), int(steps[c]), self.delta) for c in range(n) if steps[c] > 0]
        worst = max(eps) if eps else 0.0
        metrics = {"epsilon_worst": worst, "delta": self.delta, "max_client_steps": float(steps.max()),
                   "noise": noise_key.summarize([u.metrics.get(NOISE_KEYED) for u in updates])}
        return updates, {"steps": steps, "rate": rate, "sigma": sigma}, metrics


register_server_step("dp_sgd_accountant", DpSgdAccountant, DpSgdAccountantParams)

__all__ = ["DpSgdAccountant", "DpSgdLearner", "DpSgdParams", "clip_and_sum", "client_epsilon"]
