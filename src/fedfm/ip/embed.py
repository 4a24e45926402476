"""Embedding a trigger set into a model: train on it until it is answered, within a budget.

This is WAFFLE's re-training step (Tekgul et al. 2021, "WAFFLE: Watermarking in Federated
Learning", Algorithm 1): after aggregation the server trains the global model on the
trigger set alone, pass after pass, until its accuracy on the set reaches a threshold
(98% in the paper) or a step budget is spent. It is written here rather than borrowed from
the client learner (``learners/loop.py``) because it stops on the watermark accuracy,
checked after every pass over the set, and may train only part of the trainable State
(the shared names, when ``peft.local`` keeps others on the clients).

What it trains: the trainable names, minus ``train_names``' complement (the shared names,
when ``peft.local`` keeps others on the clients), minus ``settings.freeze`` (fnmatch
patterns; by default the task head, ``*classifier*`` and ``*score*``). The head is frozen
by default because re-training it on random-token triggers moves the decision for real
inputs too. Measured once (docs/ip.md, "History"), embedding 50 triggers into the final
model of a first, too small reduced job (whose test accuracy 0.82 was its majority-class
rate): through LoRA and the head at lr 1e-3 the test accuracy fell to 0.365 (56 steps);
through LoRA alone at lr 5e-3 it stayed at 0.815 (20 steps).

With ``settings.preserve`` (``ip/preserve.py``) every step adds a KL term on public text
that holds the model's outputs there at their values before the embedding.

It runs on the one base model in place: it loads ``full_state``, trains, and returns the
trained State (every trainable name). Dropout is on during training, as in any fine-tune;
the accuracy is measured in eval mode. Randomness (batch order, dropout) comes from
``seed`` inside ``torch.random.fork_rng``, so the global generators are left untouched.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Any, Collection

import torch

from fedfm.core.types import State
from fedfm.ip.verify import count_hits
from fedfm.learners.loop import batches
from fedfm.peft import get_state, set_state


HEAD_PATTERNS = ("*classifier*", "*score*")


def trained_names(names, train_names: Collection[str] | None, freeze: Collection[str]) -> list[str]:
    """The names of ``names`` the embedding trains: in ``train_names`` (None: all), not frozen."""
    return [n for n in names if (train_names is None or n in train_names)
            and not any(fnmatch.fnmatchcase(n, p) for p in freeze)]


@dataclass
class EmbedSettings:
    threshold: float = 0.98
    max_steps: int = 100
    lr: float = 5e-3
    batch_size: int = 16
    freeze: tuple[str, ...] = HEAD_PATTERNS  # fnmatch patterns of names left unchanged
    preserve: Any = None  # ip.preserve.Preserver: a KL term on public text at every step (None: triggers alone)
    # sizes of consecutive parts of the trigger list (e.g. a client's own set, then the owner's):
    # the threshold then applies to each part's accuracy, and the accuracy reported is the lowest
    # (empty: one pooled accuracy over every trigger)
    parts: tuple[int, ...] = ()


@dataclass
class EmbedResult:
    state: State
    accuracy: float  # watermark accuracy when it stopped
    steps: int
    seconds: float
    preserve_kl: float | None = None  # the KL term (unweighted) of the last step, when preserve is on


def embed(
    model: torch.nn.Module,
    task: Any,
    task_name: str,
    tokenizer: Any,
    full_state: State,
    triggers: list[dict],
    settings: EmbedSettings,
    seed: int,
    train_names: Collection[str] | None = None,
) -> EmbedResult:
    """Train ``model`` (loaded with ``full_state``) on ``triggers`` until the watermark
    accuracy is at least ``settings.threshold`` or ``settings.max_steps`` steps are spent
    (with ``settings.parts``: until every part's accuracy is).

    ``train_names``: the trainable names the optimizer may change (default: all), less
    those matching ``settings.freeze``."""
    start = time.perf_counter()
    set_state(model, full_state)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if train_names is not None:
        unknown = sorted(set(train_names) - {n for n, _ in named})
        if unknown:
            raise KeyError(f"watermark embedding: {unknown[:3]} are not trainable parameters of the model")
    chosen = set(trained_names([n for n, _ in named], train_names, settings.freeze))
    if not chosen:
        raise ValueError(f"watermark embedding: nothing left to train (freeze {list(settings.freeze)}, {len(named)} trainable names)")
    params = [p for n, p in named if n in chosen]
    if settings.parts and sum(settings.parts) != len(triggers):
        raise ValueError(f"watermark embedding: parts {list(settings.parts)} sum to {sum(settings.parts)}, "
                         f"not the {len(triggers)} triggers")
    bounds = [0]
    for size in settings.parts or (len(triggers),):
        bounds.append(bounds[-1] + size)

    def accuracy() -> float:
        shares = []
        for lo, hi in zip(bounds, bounds[1:]):
            hits, total = count_hits(task, task_name, model, tokenizer, triggers[lo:hi])
            shares.append(hits / max(total, 1))
        return min(shares)

    acc, steps, kl = accuracy(), 0, None
    if acc >= settings.threshold or settings.max_steps == 0:
        return EmbedResult(get_state(model), acc, 0, time.perf_counter() - start)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    keep = settings.preserve
    if keep is not None:
        keep.start(model, [n for n, _ in named if n in chosen])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        gen = torch.Generator().manual_seed(seed)
        public = torch.Generator().manual_seed(seed + 1)  # the public batches
        while acc < settings.threshold and steps < settings.max_steps:
            model.train()
            for items in batches(triggers, settings.batch_size, gen):
                loss = task.loss(model, task.collate(items, tokenizer))
                if keep is not None:
                    term = keep.loss(model, task, tokenizer, public)
                    kl = float(term.detach()) / keep.weight
                    loss = loss + term
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if steps >= settings.max_steps:
                    break
            if keep is not None:
                keep.recenter_head(model, task, tokenizer)  # ip/recenter.py (a no-op unless preserve.recenter)
            acc = accuracy()
    for _, p in named:
        p.grad = None
    model.eval()
    return EmbedResult(get_state(model), acc, steps, time.perf_counter() - start, kl)
