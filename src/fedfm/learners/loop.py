"""The local training loop shared by every gradient-based learner.

AdamW or SGD, a number of epochs or of steps, batches with dynamic padding, gradient-norm
clipping, and an optional extra loss term (FedProx's proximal term, FedDyn's linear term)
or gradient correction (SCAFFOLD) supplied by the learner. Seeded: the same
(seed, round, client) always gives the same batches and dropout masks.

Speed switches (learners/speed.py, all off by default): ``train.autocast``,
``train.compile``, ``train.bucket_by_length``, ``train.unpad``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch

from fedfm.learners.base import LocalContext
from fedfm.learners.speed import autocast, bucketed, compiled
from fedfm.learners.unpad import unpadded

log = logging.getLogger("fedfm.learners")


def make_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def batches(examples: list, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


def sum_losses(losses: list[torch.Tensor]) -> float:
    """The float sum of per-step losses kept on their device (one sync at the end, none per
    step), added left to right as ``total += loss.item()`` after each step would (not
    ``sum()``, which compensates its rounding from Python 3.12 on)."""
    total = 0.0
    for value in torch.stack(losses).double().cpu().tolist() if losses else []:
        total += value
    return total


def planned_steps(num_examples: int, cfg) -> int:
    per_epoch = -(-num_examples // cfg.batch_size)
    return cfg.steps if cfg.steps is not None else per_epoch * cfg.epochs


def train_loop(
    ctx: LocalContext,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train ``ctx.model`` in place; returns train loss (mean), steps and examples seen."""
    cfg = ctx.train
    model = ctx.model
    params = [p for p in model.parameters() if p.requires_grad]
    forward, fresh = compiled(model) if cfg.compile else (model, False)
    padding_free = unpadded(model) if cfg.unpad else contextlib.nullcontext()
    mode = cfg.autocast
    make_batches = bucketed if cfg.bucket_by_length else batches
    compile_s = None
    opt = make_optimizer(params, cfg)
    gen = torch.Generator().manual_seed(ctx.seed)
    torch.manual_seed(ctx.seed)  # dropout masks
    total = planned_steps(len(ctx.examples), cfg)
    model.train()
    step, seen = 0, 0
    losses: list[torch.Tensor] = []  # summed at the end: no device sync per step
    while step < total:
        for items in make_batches(ctx.examples, cfg.batch_size, gen):
            t0 = time.perf_counter()
            batch = ctx.task.collate(items, ctx.tokenizer)
            with autocast(model, mode), padding_free:
                loss = ctx.task.loss(forward, batch)
            objective = loss + extra_loss() if extra_loss is not None else loss
            opt.zero_grad(set_to_none=True)
            objective.backward()
            if after_backward is not None:
                after_backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            if fresh and step == 0:
                compile_s = time.perf_counter() - t0
                log.info("torch.compile: first training step (compilation included) took %.2f s", compile_s)
            step += 1
            seen += len(items)
            losses.append(loss.detach())
            if ctx.on_step is not None:
                ctx.on_step(step, total)
            if step >= total:
                break
    model.eval()
    loss_sum = sum_losses(losses)
    out = {"train_loss": loss_sum / max(step, 1), "steps": float(step), "examples_seen": float(seen)}
    if compile_s is not None:
        out["compile_s"] = compile_s
    return out
