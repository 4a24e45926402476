"""FedDAT's local training: a Dual-Adapter Teacher and mutual knowledge distillation
(Chen et al. 2024, "FedDAT: An Approach for Foundation Model Finetuning in Multi-Modal
Heterogeneous Federated Learning", AAAI; survey section 4.2: "a dual-adapter structure,
with personalized adapters focusing on client-specific knowledge and a global adapter
maintaining client-agnostic knowledge ... bi-directional knowledge distillation between
personalized adapters and the global adapter to regularize the client's updates and
prevent overfitting").

The model is the ``dual_adapter`` tuner (``peft/dual_adapter.py``). Each step computes two
forward passes of the same batch:

- the *student*: the global adapter alone (mode ``global``), logits ``s``;
- the *Dual-Adapter Teacher* (DAT): the personal adapter plus a frozen copy of the global
  adapter as received this round (mode ``dual`` with the teacher armed), logits ``t``;

and minimises ``CE(s, y) + CE(t, y) + kd_weight * (KD(t -> s) + KD(s -> t))`` with

    KD(a -> b) = T^2 * KL( softmax(a / T) || softmax(b / T) ),   a detached,

so the student (global adapter) is pulled toward the teacher and the personal adapter
toward the student, and the teacher's frozen global half receives no gradient. The shared
adapter's delta travels; the personal adapter stays on the client with
``peft.local: ["*.personal.*"]``. Evaluation uses the DAT (global + personal adapter).

Implemented for classification logits (``text_classification``). Not implemented: the
paper's multi-modal (vision-language) models and its Vision-Language adapters; the loss
weights and temperature of the paper are parameters here (``kd_weight``, ``temperature``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.types import Instruction, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import train_loop
from fedfm.peft.dual_adapter import adapter_mode, arm_teachers, dual_modules
from fedfm.peft.state import set_state


class FedDATParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kd_weight: float = Field(1.0, ge=0, description="weight of the two distillation terms")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of the distillation")


def distillation(source: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(source/T) || softmax(target/T)), mean over the batch; ``source``
    is detached (it teaches), the gradient flows into ``target``. Logits: (B, C)."""
    p = F.log_softmax(source.detach().float() / temperature, dim=-1)  # (B, C)
    q = F.log_softmax(target.float() / temperature, dim=-1)  # (B, C)
    return temperature**2 * F.kl_div(q, p, log_target=True, reduction="batchmean")


def mutual_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD teacher -> student, KD student -> teacher): the two directions of FedDAT's MKD."""
    return distillation(teacher, student, temperature), distillation(student, teacher, temperature)


class FedDATObjective:
    """The task seen by ``train_loop``: the task's batches, FedDAT's loss."""

    def __init__(self, task: Any, kd_weight: float, temperature: float):
        self.task, self.kd_weight, self.temperature = task, kd_weight, temperature

    def collate(self, examples, tokenizer):
        return self.task.collate(examples, tokenizer)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with adapter_mode(model, "global"):
            student = model(**inputs).logits.float()  # (B, C)
        teacher = model(**inputs).logits.float()  # (B, C), DAT: frozen global copy + personal
        to_student, to_teacher = mutual_distillation(student, teacher, self.temperature)
        ce = F.cross_entropy(student, batch["labels"]) + F.cross_entropy(teacher, batch["labels"])
        return ce + self.kd_weight * (to_student + to_teacher)


class FedDATLearner:
    def __init__(self, params: FedDATParams):
        self.params = params

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        if not dual_modules(ctx.model):
            raise ValueError(f"learner 'feddat' (client {ctx.cid}) needs peft.method: dual_adapter")
        set_state(ctx.model, instruction.state)
        arm_teachers(ctx.model)
        try:
            objective = FedDATObjective(ctx.task, self.params.kd_weight, self.params.temperature)
            metrics = train_loop(replace(ctx, task=objective))
        finally:
            arm_teachers(ctx.model, armed=False)
        return delta_update(instruction, ctx, metrics)


def feddat_config_problem(exp) -> str | None:
    """FedDAT needs the dual adapter on a classification task."""
    if exp.learner.name != "feddat":
        return None
    if exp.peft.method != "dual_adapter":
        return f"learner feddat: needs peft.method dual_adapter (got '{exp.peft.method}')"
    if exp.model.task != "text_classification":
        return f"learner feddat: distils classification logits; model.task '{exp.model.task}' is not supported"
    return None


register_learner("feddat", FedDATLearner, FedDATParams)
