"""FedDAT-inspired local training: a Dual-Adapter Teacher and mutual knowledge distillation
(Chen et al. 2024, "FedDAT: An Approach for Foundation Model Finetuning in Multi-Modal
Heterogeneous Federated Learning", AAAI; survey section 4.2: "a dual-adapter structure,
with personalized adapters focusing on client-specific knowledge and a global adapter
maintaining client-agnostic knowledge ... bi-directional knowledge distillation between
personalized adapters and the global adapter to regularize the client's updates and
prevent overfitting").

The model is the ``dual_adapter`` tuner (``peft/dual_adapter.py``): at every placement a
shared (global) adapter, a personal adapter and a frozen copy of the shared adapter as
received this round (armed at the start of the round). Two models read a batch:

- the *student*: the global adapter alone (mode ``global``), logits ``s``;
- the *Dual-Adapter Teacher* (DAT): the personal adapter beside the frozen global copy
  (mode ``dual`` with the teacher armed), logits ``t``.

Each batch takes TWO optimizer steps, in this order, as the authors' code does
(HaokunChen245/FedDAT, ``src/train/visionlanguage_tasks/task_trainer.py``, ``train_step``):

1. ``t0``: the DAT's logits without gradient;
2. the student's logits ``s``; step on ``L_s = (CE(s, y) + kd_weight * KD(t0 -> s)) / 2``
   (it moves the global adapter and the trainable extras, the head and LayerNorms);
3. the DAT's logits ``t`` (after that step); step on
   ``L_t = (CE(t, y) + kd_weight * KD(s -> t)) / 2`` with ``s`` the student logits of step
   2, detached (computed before the student's step, as in the authors' code); it moves
   the personal adapter and the extras; the frozen copy gets no gradient;

with ``KD(a -> b) = T^2 * KL(softmax(a / T) || softmax(b / T))`` (batch mean, ``a``
detached) and T = 3, the authors' ``kl_loss``. Both steps use the one optimizer of
``train`` (the authors: one AdamW over both adapters). ``train.steps`` / ``epochs``
count batches; each batch is two optimizer steps (metric ``optimizer_steps``). Metrics:
``train_loss`` (mean ``L_t``), ``student_loss`` (mean ``L_s``). The shared adapter's
delta travels; the personal adapter stays on the client with
``peft.local: ["*.personal.*"]``. Evaluation uses the DAT (the current global adapter +
the personal adapter).

What differs from FedDAT (hence "FedDAT-inspired"):

- the DAT *sums* its two adapters, ``h + global_copy(h) + personal(h)``, where the
  authors' adapter (``src/modeling/models/adapter.py``, gating on) averages them,
  ``h + 0.5 * (global_copy(h) + personal(h))``; the tuner (``peft/dual_adapter.py``)
  fixes that sum, for training and evaluation alike;
- text classification only (refused otherwise): not the paper's vision-language models
  and adapters.

Speed switches: ``train.autocast`` and ``train.bucket_by_length`` are honoured;
``train.compile`` and ``train.unpad`` are refused at config time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import batches, make_optimizer, planned_steps, sum_losses
from fedfm.learners.speed import autocast, bucketed
from fedfm.peft.dual_adapter import adapter_mode, arm_teachers, dual_modules
from fedfm.peft.state import set_state


class FedDATParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kd_weight: float = Field(1.0, ge=0, description="weight of the distillation term in each step's loss (the authors: 1)")
    temperature: float = Field(3.0, gt=0, description="softmax temperature T of the distillation (the authors: 3)")


def distillation(source: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(source/T) || softmax(target/T)), mean over the batch; ``source``
    is detached (it teaches), the gradient flows into ``target``. Logits: (B, C)."""
    p = F.log_softmax(source.detach().float() / temperature, dim=-1)  # (B, C)
    q = F.log_softmax(target.float() / temperature, dim=-1)  # (B, C)
    return temperature**2 * F.kl_div(q, p, log_target=True, reduction="batchmean")


def step_loss(ce: torch.Tensor, kd: torch.Tensor, kd_weight: float) -> torch.Tensor:
    """One of FedDAT's two step losses: ``(CE + kd_weight * KD) / 2``."""
    return (ce + kd_weight * kd) / 2


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, max_grad_norm: float | None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
    opt.step()


def feddat_batch(model, batch: dict, opt, params: list, p: FedDATParams, max_grad_norm, mode=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FedDAT's two optimizer steps on one batch (module docstring); returns (L_s, L_t) detached."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    y = batch["labels"]
    with torch.no_grad(), autocast(model, mode):
        t0 = model(**inputs).logits.float()  # (B, C): the DAT before either step
    with adapter_mode(model, "global"), autocast(model, mode):
        s = model(**inputs).logits.float()  # (B, C): the student (global adapter alone)
    loss_s = step_loss(F.cross_entropy(s, y), distillation(t0, s, p.temperature), p.kd_weight)
    _step(opt, loss_s, params, max_grad_norm)
    with autocast(model, mode):
        t = model(**inputs).logits.float()  # (B, C): the DAT (frozen global copy + personal)
    loss_t = step_loss(F.cross_entropy(t, y), distillation(s, t, p.temperature), p.kd_weight)
    _step(opt, loss_t, params, max_grad_norm)
    return loss_s.detach(), loss_t.detach()


def feddat_train(ctx: LocalContext, p: FedDATParams) -> dict[str, float]:
    """The local loop (seeded as ``learners.loop.train_loop``: same batches and dropout
    masks for the same (seed, round, client)) with FedDAT's two steps per batch."""
    cfg = ctx.train
    model = ctx.model
    params = [q for q in model.parameters() if q.requires_grad]
    opt = make_optimizer(params, cfg)
    gen = torch.Generator().manual_seed(ctx.seed)
    torch.manual_seed(ctx.seed)  # dropout masks
    make_batches = bucketed if cfg.bucket_by_length else batches
    total = planned_steps(len(ctx.examples), cfg)
    model.train()
    step, seen = 0, 0
    student, dat = [], []
    while step < total:
        for items in make_batches(ctx.examples, cfg.batch_size, gen):
            batch = ctx.task.collate(items, ctx.tokenizer)
            loss_s, loss_t = feddat_batch(model, batch, opt, params, p, cfg.max_grad_norm, cfg.autocast)
            student.append(loss_s)
            dat.append(loss_t)
            step += 1
            seen += len(items)
            if ctx.on_step is not None:
                ctx.on_step(step, total)
            if step >= total:
                break
    model.eval()
    n = max(step, 1)
    return {"train_loss": sum_losses(dat) / n, "student_loss": sum_losses(student) / n, "steps": float(step),
            "optimizer_steps": float(2 * step), "examples_seen": float(seen)}


class FedDATLearner:
    def __init__(self, params: FedDATParams):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        if not dual_modules(ctx.model):
            raise ValueError(f"learner 'feddat' (client {ctx.cid}) needs peft.method: dual_adapter")
        set_state(ctx.model, instruction.state)
        arm_teachers(ctx.model)
        try:
            metrics = feddat_train(ctx, self.params)
        finally:
            arm_teachers(ctx.model, armed=False)
        return delta_update(instruction, ctx, metrics)


def feddat_config_problem(exp) -> str | None:
    """FedDAT needs the dual adapter on a classification task, with ``peft.local`` keeping
    something on the clients (the personal adapters); its own loop does not compile or
    unpad the model."""
    if exp.learner.name != "feddat":
        return None
    if exp.peft.method != "dual_adapter":
        return f"learner feddat: needs peft.method dual_adapter (got '{exp.peft.method}')"
    if exp.model.task != "text_classification":
        return f"learner feddat: distils classification logits; model.task '{exp.model.task}' is not supported"
    off = [k for k, on in (("compile", exp.train.compile), ("unpad", exp.train.unpad)) if on]
    if off:
        return f"train.{off[0]}: learner feddat trains with its own two-step loop, which does not apply it; turn it off"
    if not exp.peft.local:
        return ("learner feddat: peft.local is empty, so the personal adapters would travel and be averaged like the "
                "shared ones (no client keeps its own); set peft.local: ['*.personal.*']")
    return None


register_learner("feddat", FedDATLearner, FedDATParams)
