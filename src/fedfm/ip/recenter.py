"""Re-centering the task head after a watermark embedding: mean logits on public text held.

Measured on the quickstart (docs/ip.md), most of what an embedding costs in clean accuracy
is one shift of every input's decision margin: fitting random labels on random-token
sentences is cheapest by moving all answers, and the per-example KL term of
``ip/preserve.py`` holds them only in part. ``preserve.recenter`` removes what is left of
that shift: before every check of the trigger accuracy (so the threshold is judged on the
re-centered model, and the triggers must be learned through their own tokens), the task
head's bias is moved by ``-(mean logits now - mean logits at the start)`` over the public
texts (not the ``random_texts``), in eval mode. Logits are linear in the bias, so after the
move the mean logits on those texts are exactly the starting model's. It is a
post-processing of the classifier (a calibration step), not part of WAFFLE (Tekgul et al.
2021) or of DUW (Yu et al. 2023); text classification only (refused at config time for
other tasks). Written by hand: a few lines on the model's own head, no library does it.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Any

import torch

BIAS_PATTERNS = ("*classifier*bias", "*score*bias")
EVAL_BATCH = 64


def head_bias(model: torch.nn.Module) -> tuple[str, torch.nn.Parameter]:
    """The trainable bias of the classification head (one name matching ``BIAS_PATTERNS``)."""
    found = [(n, p) for n, p in model.named_parameters()
             if p.requires_grad and p.dim() == 1 and any(fnmatch(n, pat) for pat in BIAS_PATTERNS)]
    if len(found) != 1:
        names = [n for n, _ in found]
        raise ValueError(f"preserve.recenter needs exactly one trainable head bias matching {BIAS_PATTERNS}; "
                         f"the model has {names or 'none'}")
    return found[0]


def mean_logits(model: torch.nn.Module, task: Any, tokenizer: Any, examples: list[dict], values: dict | None = None) -> torch.Tensor:
    """Mean (C,) logits of ``model`` in eval mode over ``examples`` (``values``: parameter
    values to use instead of the model's, through ``torch.func.functional_call``)."""
    training = model.training
    model.eval()
    total = None
    with torch.no_grad():
        for i in range(0, len(examples), EVAL_BATCH):
            batch = task.collate(examples[i : i + EVAL_BATCH], tokenizer)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if values is None:
                logits = model(**inputs).logits
            else:
                logits = torch.func.functional_call(model, values, args=(), kwargs=inputs, strict=False).logits
            part = logits.float().sum(0)
            total = part if total is None else total + part
    model.train(training)
    return total / len(examples)


def recenter(model: torch.nn.Module, task: Any, tokenizer: Any, examples: list[dict], reference: dict,
             target: torch.Tensor | None = None) -> torch.Tensor:
    """Move the head bias so that the mean logits over ``examples`` equal those of the model
    with ``reference`` values (which must hold the bias's starting value); returns the move.
    ``target``: those reference mean logits when already computed (they do not change during
    one embedding: ``Preserver`` computes them once)."""
    name, bias = head_bias(model)
    if name not in reference:
        raise KeyError(f"recenter: the reference values lack the head bias '{name}'")
    if target is None:
        target = mean_logits(model, task, tokenizer, examples, reference)
    shift = mean_logits(model, task, tokenizer, examples) - target
    with torch.no_grad():
        bias.sub_(shift.to(bias.dtype))
    return -shift
