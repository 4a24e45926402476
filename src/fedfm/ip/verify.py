"""Watermark accuracy of a model on a trigger set, and a binomial p-value against chance.

Ownership is claimed as in WAFFLE (Tekgul et al. 2021, "WAFFLE: Watermarking in Federated
Learning"): the suspect model is queried on the owner's trigger set, and the owner shows
that it answers far more of them as assigned than chance allows. The hit count ``k`` of
``n`` checked items (triggers for classification, continuation tokens for causal LMs) of a
model that never saw the key is binomial(n, p0) or dominated by it (see ``trigger.py``),
so ``P[X >= k]`` under that law is a valid p-value; it comes from ``scipy.stats.binom``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from scipy.stats import binom

from fedfm.ip.trigger import IGNORE, TriggerSpec, chance

EVAL_BATCH = 64


@dataclass(frozen=True)
class Verdict:
    hits: int
    total: int
    chance: float
    p_value: float

    @property
    def accuracy(self) -> float:
        return self.hits / self.total if self.total else 0.0

    def verified(self, alpha: float) -> bool:
        return self.p_value < alpha


def p_value(hits: int, total: int, p0: float) -> float:
    """``P[X >= hits]`` for ``X ~ Binomial(total, p0)`` (1.0 for no hits)."""
    if not 0 < p0 < 1:
        raise ValueError(f"chance level must be in (0, 1), got {p0}")
    if hits <= 0:
        return 1.0
    return float(binom.sf(hits - 1, total, p0))


def batch_hits(task_name: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(items answered as assigned, items checked) in one collated trigger batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task_name == "text_classification":
        pred = logits.float().argmax(-1)  # (B,)
        return int((pred == batch["labels"]).sum()), int(batch["labels"].numel())
    pred = logits[:, :-1, :].argmax(-1)  # (B, T-1): position t predicts t+1
    target = batch["labels"][:, 1:]  # (B, T-1)
    mask = target != IGNORE
    return int(((pred == target) & mask).sum()), int(mask.sum())


@torch.no_grad()
def count_hits(task: Any, task_name: str, model: torch.nn.Module, tokenizer: Any, triggers: list[dict]) -> tuple[int, int]:
    """(hits, total) of ``model`` (as it is now, in eval mode) over the trigger set."""
    was_training = model.training
    model.eval()
    hits = total = 0
    for i in range(0, len(triggers), EVAL_BATCH):
        h, n = batch_hits(task_name, model, task.collate(triggers[i : i + EVAL_BATCH], tokenizer))
        hits, total = hits + h, total + n
    model.train(was_training)
    return hits, total


def verdict(task: Any, spec: TriggerSpec, model: torch.nn.Module, tokenizer: Any, triggers: list[dict]) -> Verdict:
    hits, total = count_hits(task, spec.task, model, tokenizer, triggers)
    p0 = chance(spec, tokenizer)
    return Verdict(hits, total, p0, p_value(hits, total, p0))
