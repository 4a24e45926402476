"""Watermark accuracy of a model on a trigger set, and a binomial p-value against chance.

Ownership is claimed as in WAFFLE (Tekgul et al. 2021, "WAFFLE: Watermarking in Federated
Learning"): the suspect model is queried on the owner's trigger set, and the owner shows
that it answers far more of them as assigned than chance allows. The hit count ``k`` of
``n`` checked items (triggers for classification, continuation tokens for causal LMs) of a
model that never saw the key is binomial(n, p0) or dominated by it (see ``trigger.py``),
so ``P[X >= k]`` under that law is a valid p-value; it comes from ``scipy.stats.binom``.

Pattern triggers (``TriggerSpec.kind == "pattern"``, ``trigger.py``): the ``F`` triggers
of a pattern share its secret tokens, so a clean model that reacts to those tokens answers
them alike and their hits are NOT independent; a binomial over triggers would be invalid.
So each pattern casts one vote: it counts as a hit when the model answers the pattern's
label on a strict majority of its ``F`` triggers (more than ``F/2``; a tie is a miss), and
the p-value is Binomial(``patterns``, ``1/num_labels``) over the votes. Why that is valid:
a model that never saw the key is a fixed function of the trigger inputs; the labels are
drawn uniformly, independently of the inputs and of each other. Given the inputs, at most
one label can win a strict majority of a pattern's answers, so the pattern is a hit with
probability at most ``1/num_labels`` (exactly that when some label wins, 0 when none does),
independently across patterns (their labels are independent). The vote count is therefore
dominated by Binomial(patterns, 1/num_labels), and ``P[X >= votes]`` under it is a valid
p-value.
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


def row_hits(task_name: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(items answered as assigned, items checked) per trigger of one collated batch, each (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task_name == "text_classification":
        pred = logits.float().argmax(-1)  # (B,)
        return (pred == batch["labels"]).long(), torch.ones_like(batch["labels"])
    pred = logits[:, :-1, :].argmax(-1)  # (B, T-1): position t predicts t+1
    target = batch["labels"][:, 1:]  # (B, T-1)
    mask = target != IGNORE
    return ((pred == target) & mask).sum(-1), mask.sum(-1)


def batch_hits(task_name: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(items answered as assigned, items checked) in one collated trigger batch."""
    hits, total = row_hits(task_name, model, batch)
    return int(hits.sum()), int(total.sum())


@torch.no_grad()
def trigger_hits(task: Any, task_name: str, model: torch.nn.Module, tokenizer: Any, triggers: list[dict]) -> list[int]:
    """Per trigger, the items ``model`` (in eval mode) answers as assigned (0/1 for classification)."""
    was_training = model.training
    model.eval()
    out: list[int] = []
    for i in range(0, len(triggers), EVAL_BATCH):
        out += row_hits(task_name, model, task.collate(triggers[i : i + EVAL_BATCH], tokenizer))[0].tolist()
    model.train(was_training)
    return out


def pattern_votes(hits: list[int], fillers: int) -> int:
    """Patterns whose label the model answers on a strict majority (> fillers/2) of their
    ``fillers`` triggers; ``hits`` is per trigger, pattern by pattern (``trigger.pattern_set``).
    A tie is a miss."""
    if fillers < 1 or len(hits) % fillers:
        raise ValueError(f"{len(hits)} trigger hits do not split into patterns of {fillers} triggers")
    return sum(int(2 * sum(hits[j : j + fillers]) > fillers) for j in range(0, len(hits), fillers))


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
    """Hits, items and p-value of ``model`` on ``triggers`` (drawn with ``spec``): over
    triggers for random ones, over patterns (one majority vote each) for pattern triggers."""
    p0 = chance(spec, tokenizer)
    if spec.kind == "pattern":
        per = trigger_hits(task, spec.task, model, tokenizer, triggers)
        if len(per) != spec.examples:
            raise ValueError(f"{len(per)} triggers, the pattern spec draws {spec.examples}")
        votes = pattern_votes(per, spec.fillers_per_pattern)
        return Verdict(votes, spec.patterns, p0, p_value(votes, spec.patterns, p0))
    hits, total = count_hits(task, spec.task, model, tokenizer, triggers)
    return Verdict(hits, total, p0, p_value(hits, total, p0))
