"""``fedfa``: a Fed-FA-inspired filter (Zhang, Chen, Zhou, Meng, Zhou and Sun 2023,
"Fed-FA: Theoretically Modeling Client Data Divergence for Federated Language Backdoor
Defense", NeurIPS), a server step at stage ``updates``.

Fed-FA scores each client by an f-divergence indicator between its data and the others',
which to second order is a curvature-weighted squared distance of its update,

    I_k = 1/2 * sum_j H_jj * (x_kj - c_j)^2

and discards the clients whose indicator is an outlier. What is implemented:

- ``H``: the diagonal Fisher information of the *current global model* on a synthetic
  dataset of ``synthetic`` random token sequences (ids drawn uniformly from the tokenizer's
  non-special vocabulary, length ``length``), labels drawn from the model's own predictive
  distribution (so E[g^2] is the Fisher, the Gauss-Newton approximation of the Hessian);
  ``curvature: identity`` uses H = 1 (then it is a plain distance filter);
- ``c``: the coordinate-wise median of the round's updates;
- discard: clients with ``I_k > median(I) + kappa * 1.4826 * MAD(I)`` (a robust z-score),
  never more than ``floor((n - 1) / 2)`` of them (the highest scores first); the rule that
  follows (``aggregator.rule: fedavg``) averages the rest.

What is not: the paper's dataset synthesization guided by diffusion theory and its
Hessian *reassignment* (redistributing the curvature of embedding rows to the words that
matter) are not implemented; the synthetic data here is uniform random tokens. So this
is "Fed-FA-inspired", not Fed-FA.

The current global model is the round's ``RoundContext.model`` (the State the round started
from), whatever the rule, server optimizer or later steps; the step keeps no state. Where
a context carries no model (a step called outside a run), the workbench's initial State
is used. With ``peft.local`` the Fisher is taken on the model completed by the initial
local tensors (the server holds no client's own). Metrics: ``discarded``,
``indicator_median``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.median import coordinate_median
from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.seeding import derive_seed
from fedfm.core.types import State, Update

FEDFA_TAG = 0xFEDFA


class FedFAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    curvature: Literal["fisher", "identity"] = Field("fisher", description="diagonal Fisher on synthetic data, or 1")
    kappa: float = Field(2.0, gt=0, description="robust z-score above which a client is discarded")
    synthetic: int = Field(16, ge=1, description="number of synthetic sequences for the Fisher")
    length: int = Field(16, ge=3, description="tokens per synthetic sequence (special tokens included)")


def indicators(updates: list[State], h: State) -> torch.Tensor:
    """(n,) I_k = 1/2 sum_j h_j (x_kj - median_j)^2."""
    names = list(h)
    centre = coordinate_median({k: h[k] for k in names}, updates, [1.0] * len(updates))
    return torch.tensor(
        [0.5 * sum(float((h[k].double() * (u[k].double() - centre[k].double()).pow(2)).sum()) for k in names) for u in updates],
        dtype=torch.float64,
    )


def outliers(scores: torch.Tensor, kappa: float) -> list[int]:
    """Positions whose robust z-score exceeds kappa, at most floor((n - 1) / 2), highest first."""
    n = len(scores)
    med = scores.median() if n % 2 else scores.sort().values[n // 2 - 1 : n // 2 + 1].mean()
    dev = (scores - med).abs()
    mad = dev.median() if n % 2 else dev.sort().values[n // 2 - 1 : n // 2 + 1].mean()
    limit = med + kappa * 1.4826 * mad
    flagged = [i for i in range(n) if scores[i] > limit and (mad > 0 or scores[i] > med)]
    flagged.sort(key=lambda i: -float(scores[i]))
    return sorted(flagged[: (n - 1) // 2])


def synthetic_fisher(wb, model_state: State, count: int, length: int, seed: int) -> State:
    """Diagonal Fisher of the model at ``model_state`` on random token sequences."""
    from fedfm.peft import set_state

    if wb.exp.model.task != "text_classification":
        raise ValueError(f"fedfa: curvature 'fisher' needs model.task text_classification, not {wb.exp.model.task!r}; use curvature: identity")
    tok, model = wb.tokenizer, wb.model
    set_state(model, wb.full_state(model_state))
    model.eval()
    special = set(tok.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tok)) if i not in special], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and n in model_state}
    fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    for _ in range(count):
        body = vocab[torch.randint(len(vocab), (length - 2,), generator=g)].tolist()
        ids = torch.tensor([[cls_id, *body, sep_id]], dtype=torch.long)  # (1, T)
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()  # (1, C)
            y = torch.multinomial(logits.detach().softmax(-1), 1, generator=g).view(-1)
            torch.nn.functional.cross_entropy(logits, y).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().double().pow(2) / count
    model.zero_grad(set_to_none=True)
    return {n: fisher[n] if n in fisher else torch.zeros_like(t, dtype=torch.float64) for n, t in model_state.items()}


class FedFA:
    name = "fedfa"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: FedFAParams):
        self.p = params

    def __call__(self, updates: list[Update], ctx, state: State):
        if not updates:
            return updates, state, {}
        names = list(updates[0].payload)
        if ctx.model is not None:
            missing = [k for k in names if k not in ctx.model]
            if missing:
                raise ValueError(f"fedfa: the updates carry {missing[:3]}, which the model State does not hold")
            model = {k: ctx.model[k] for k in names}
        elif ctx.workbench is not None:
            model = {k: ctx.workbench.template[k].clone() for k in names}
        else:
            model = {k: torch.zeros_like(updates[0].payload[k]) for k in names}
        if self.p.curvature == "identity":
            h = {k: torch.ones_like(model[k], dtype=torch.float64) for k in names}
        else:
            if ctx.workbench is None:
                raise ValueError("fedfa: curvature 'fisher' needs the round's workbench (the base model)")
            h = synthetic_fisher(ctx.workbench, model, self.p.synthetic, self.p.length, derive_seed(ctx.seed, ctx.round, FEDFA_TAG))
        payloads = [u.payload for u in updates]
        scores = indicators(payloads, h)
        drop = set(outliers(scores, self.p.kappa))
        kept = [u for i, u in enumerate(updates) if i not in drop]
        return kept, {}, {"discarded": len(drop), "indicator_median": float(scores.median())}


register_server_step("fedfa", FedFA, FedFAParams)
