"""MeZO's memory-efficient zeroth-order step (Malladi et al. 2023, "Fine-Tuning Language
Models with Just Forward Passes", Algorithm 1): the SPSA two-point estimate

    g = (L(w + eps z) - L(w - eps z)) / (2 eps),      then  w <- w - lr g z,

with ``z ~ N(0, I)`` over the trainable parameters regenerated from a seed (per parameter,
``aggregators/zo_replay.param_noise``), never stored. It works on whatever is trainable in
``ctx.model``: full parameters or any PEFT State.

Restoring the parameters. MeZO perturbs in place (+eps, -2eps, +eps). In floating point
that does not give the parameters back: ``x -> fl(x + eps z)`` is not injective (every
float32 between -eps|z|/2 and eps|z|/2 is far denser than the floats near eps|z|), so no
in-place sequence can restore them bit-exactly (``tests/test_zeroth_order_mezo.py`` counts
the changed entries). Here the perturbation is applied out of place instead: a forward
pre-hook on each module that owns a trainable parameter swaps in ``x + eps z`` for that
module's forward only and puts the stored tensor back after it, so the stored parameters
are never written during the two evaluations and are bit-identical when the update is
applied. Memory stays at inference level plus one module's perturbed copy, built in the
buffer of its ``z`` (the same peak as in-place MeZO, which also draws each parameter's
``z`` whole). A parameter registered on several modules (transformers'
``BertForMaskedLM``: ``cls.predictions.bias`` is also its child ``decoder``'s bias; tied
input and output embeddings) is perturbed once: a per-parameter count of its owners whose
forward is running swaps ``x + eps z`` in when the first one starts and the stored tensor
back when it ends, so a nested owner sees ``x + eps z``, never ``x + 2 eps z``; owners
that run one after the other each draw the same ``z``. A parameter that some code reads
outside its own modules' forwards is refused with its name.
The evaluations run in eval mode (no dropout), so both see the same function.

Written by hand: no maintained library implements MeZO's seeded, storage-free estimate.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from fedfm.aggregators.zo_replay import param_noise


def trainable_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def perturbed(model: torch.nn.Module, seed: int, scale: float, portable: bool = True) -> Iterator[None]:
    """Forward passes inside see every trainable ``x`` as ``x + scale * z(seed)``; the
    stored parameters are never written. Raises if a trainable parameter was not reached
    through its owning module's forward."""
    params = trainable_params(model)
    index = {id(p): i for i, (_, p) in enumerate(sorted(params.items()))}
    names = {id(p): n for n, p in params.items()}
    saved: dict[int, torch.Tensor] = {}  # the stored tensor of each parameter now perturbed
    depth: dict[int, int] = {}  # owners of the parameter whose forward is running (nested modules)
    fired: set[int] = set()
    handles = []

    def make_hooks(owned: list[torch.nn.Parameter]):
        def pre(module, args):
            for p in owned:
                pid = id(p)
                depth[pid] = depth.get(pid, 0) + 1
                if depth[pid] == 1:  # not already perturbed by an enclosing owner's forward
                    z = param_noise(p.shape, seed, index[pid], portable).to(p.device, p.dtype)
                    saved[pid] = p.data
                    p.data = z.mul_(scale).add_(p.data)  # x + scale z, in z's buffer: one extra tensor
                    fired.add(pid)

        def post(module, args, output):
            for p in owned:
                pid = id(p)
                depth[pid] -= 1
                if depth[pid] == 0:
                    p.data = saved.pop(pid)

        return pre, post

    for module in model.modules():
        owned = [p for p in module.parameters(recurse=False) if id(p) in index]
        if owned:
            pre, post = make_hooks(owned)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for pid, stored in saved.items():  # a forward that raised between the two hooks
            next(q for q in params.values() if id(q) == pid).data = stored
    missing = sorted(names[i] for i in index if i not in fired)
    if missing:
        raise RuntimeError(
            f"zeroth-order perturbation did not reach trainable parameters {missing[:3]}: they are read "
            "outside their own module's forward (or no forward ran)"
        )


@torch.no_grad()
def spsa_estimate(model: torch.nn.Module, loss_fn: Callable[[], float], seed: int, eps: float,
                  portable: bool = True) -> tuple[float, float, float]:
    """(projected gradient g, L(w + eps z), L(w - eps z)): two forward passes."""
    with perturbed(model, seed, eps, portable):
        plus = float(loss_fn())
    with perturbed(model, seed, -eps, portable):
        minus = float(loss_fn())
    return (plus - minus) / (2.0 * eps), plus, minus


@torch.no_grad()
def step_along(model: torch.nn.Module, seed: int, coef: float, portable: bool = True) -> None:
    """In place: every trainable ``x <- x + coef * z(seed)`` (the update, ``coef = -lr g``)."""
    params = trainable_params(model)
    for i, (_, p) in enumerate(sorted(params.items())):
        p.add_(param_noise(p.shape, seed, i, portable).to(p.device, p.dtype).mul_(coef))  # unfused, as zo_replay


def cycle_batches(ctx, generator: torch.Generator):
    """Endless shuffled minibatches of the client's examples (collated)."""
    from fedfm.learners.loop import batches

    while True:
        for items in batches(ctx.examples, ctx.train.batch_size, generator):
            yield ctx.task.collate(items, ctx.tokenizer)


def zo_train(ctx, steps: int, eps: float, lr: float, seed_of: Callable[[int], int],
             portable: bool = True) -> tuple[list[float], dict[str, float]]:
    """``steps`` MeZO steps on ``ctx.model`` in place; step t perturbs along ``seed_of(t)``
    (``portable``: the draw of ``zo_replay.param_noise``). Returns the projected gradients
    and the metrics (2 forward passes per step)."""
    if not ctx.examples:
        raise ValueError(f"client {ctx.cid} has no training examples")
    model = ctx.model
    model.eval()
    data = cycle_batches(ctx, torch.Generator().manual_seed(ctx.seed))
    grads, loss_sum = [], 0.0
    for t in range(steps):
        batch = next(data)
        seed = seed_of(t)
        g, plus, minus = spsa_estimate(model, lambda: ctx.task.loss(model, batch).item(), seed, eps, portable)
        step_along(model, seed, -lr * g, portable)
        grads.append(g)
        loss_sum += 0.5 * (plus + minus)
        if ctx.on_step is not None:
            ctx.on_step(t + 1, steps)
    metrics = {"train_loss": loss_sum / max(steps, 1), "steps": float(steps), "forward_passes": 2.0 * steps}
    return grads, metrics
