"""Several clients' local LoRA training in one forward/backward pass per step: the
``local`` learner (FedAvg's client side; McMahan et al. 2017) for ``K`` clients at once,
with multi-adapter batching (``peft/multi_lora.py``; S-LoRA / Punica-style batched LoRA,
written in torch). Used by ``runtime.transport: batched`` (runtime/batched.py).

Each client keeps its own copy of the trainable State (LoRA factors and head) as leaf
tensors; one optimizer (``learners.loop.make_optimizer``: the same AdamW / SGD as the
``local`` learner) holds every client's tensors: both are element-wise, so this is each
client's own optimizer, stepped in one call. At step ``t`` every client that still has
a step to do draws its next batch from its own seeded stream (``torch.Generator`` seeded
with the client's ``ctx.seed``, ``derive_seed(seed, round, cid)``, epochs and
``train.steps`` exactly as ``learners.loop.train_loop``), so each client sees the same
batches in the same order as when trained alone. The step's batches are concatenated
(client after client), collated once (padded to the longest example of the step) and run
through the model once, each example with its client's adapter. The objective is the SUM
over clients of each client's mean loss on its own batch (the task's own ``loss``); the
clients' parameters are disjoint and the frozen base model has no cross-example term, so
each client's gradient is the one it would get alone. Then, per client: gradient-norm
clipping over that client's tensors only (``train.max_grad_norm``; all clients in one
pass, ``clip_per_client``); then the optimizer step. A client with no batch at step
``t`` (fewer examples, or done) has no gradient
(``None``), which torch's optimizers skip: no momentum update, no weight decay. The train
loss is summed per client at the end (``learners.loop.sum_losses``, as ``train_loop``
does: no device sync per step).

Not bit-identical to sequential training, for three reasons: the float sums of a bigger
batch with wider padding (and bmm instead of linear for the adapters) round differently;
the dropout masks are drawn from one generator for the joint batch (seeded with the first
client's seed), not from each client's; with dropout off, the updates agree to float
rounding (tests/test_batched_transport.py states the tolerance).

Honours ``train.autocast`` (the joint forward and the losses under bf16 autocast) and
``train.bucket_by_length`` (each client's own stream is bucketed, as in ``train_loop``).
``train.compile`` is refused at config time (runtime/batched.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import torch

from fedfm.core.types import Instruction, State, Update
from fedfm.learners.base import LocalContext
from fedfm.learners.loop import batches, make_optimizer, planned_steps, sum_losses
from fedfm.learners.speed import autocast, bucketed
from fedfm.peft.multi_lora import AdapterBatch
from fedfm.peft.state import trainable_names


def client_stream(examples: list, cfg, generator: torch.Generator) -> Iterator[list]:
    """A client's batches in ``train_loop``'s order: epochs of seeded permutations,
    ``planned_steps`` of them in all."""
    total = planned_steps(len(examples), cfg)
    make = bucketed if cfg.bucket_by_length else batches
    step = 0
    while step < total and examples:
        for items in make(examples, cfg.batch_size, generator):
            yield items
            step += 1
            if step >= total:
                return


@dataclass
class _Client:
    inst: Instruction
    ctx: LocalContext
    params: dict[str, torch.Tensor]
    stream: Iterator[list]
    steps: int = 0
    seen: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)  # per step, summed at the end (no sync per step)


def slice_batch(batch: dict[str, Any], start: int, end: int, n: int) -> dict[str, Any]:
    return {k: v[start:end] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v for k, v in batch.items()}


def forward_once(task, model, batch: dict[str, Any]) -> Any:
    """The model's output on ``batch``, from the one forward the task's own ``loss`` makes
    (the whole-batch loss it returns is not used)."""
    seen: dict[str, Any] = {}

    def record(*args, **kwargs):
        seen["out"] = model(*args, **kwargs)
        return seen["out"]

    task.loss(record, batch)
    return seen["out"]


def slice_output(out: Any, start: int, end: int, n: int) -> SimpleNamespace:
    """Rows ``start:end`` of every batch-first tensor of a model output (``.logits`` etc.)."""
    return SimpleNamespace(**{k: v[start:end] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                              for k, v in out.items()})


def joint_losses(task, model, batch: dict[str, Any], spans: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """One forward of ``model`` on ``batch``, then each span's mean loss by the task's
    ``loss`` on its slice of the outputs and of the batch."""
    n = spans[-1][1]
    out = forward_once(task, model, batch)
    return [task.loss(lambda *a, _p=slice_output(out, s, e, n), **k: _p, slice_batch(batch, s, e, n)) for s, e in spans]


def clip_per_client(groups: Sequence[Sequence[torch.Tensor]], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(group, max_norm)`` for every group (one client's
    tensors), in one pass: one ``_foreach_norm`` over every group's gradients, the groups'
    total norms as one ``(K, T)`` reduction, then one multiply per group. The same
    formula as torch's (``max_norm / (total + 1e-6)``, clamped at 1); on this project's
    CPU equal to it bit for bit (tests/test_batched_kernels.py). Groups of different
    sizes or with a missing gradient are clipped one by one by torch's own function."""
    grads = [p.grad for g in groups for p in g]
    if not grads or any(x is None for x in grads) or len({len(g) for g in groups}) != 1:
        for g in groups:
            torch.nn.utils.clip_grad_norm_(list(g), max_norm)
        return
    norms = torch.stack(torch._foreach_norm(grads, 2.0)).view(len(groups), len(groups[0]))  # (K, T)
    total = torch.linalg.vector_norm(norms, 2.0, dim=1)  # (K,)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for k, g in enumerate(groups):
        torch._foreach_mul_([p.grad for p in g], coef[k])


def shared_leaves(clients: Sequence[_Client], names: Sequence[str], cfg, kernel: str) -> dict[str, torch.Tensor] | None:
    """With the ``stacked`` kernel and every client planned for the same number of steps
    (so every client has a batch at every joint step): each trainable name's K client
    tensors as ONE ``(K, *shape)`` leaf, which the optimizer steps and the adapters use as
    it is, and each client's ``params`` rebound to its row (a view). This saves, per joint
    step, stacking the K tensors of every name and the K gradient copies back to them (a
    kernel launch each on a GPU). The optimizer's step count is shared, which is right
    only because every client steps at every joint step. None otherwise."""
    steps = {planned_steps(len(c.ctx.examples), cfg) if c.ctx.examples else 0 for c in clients}
    if kernel != "stacked" or len(steps) != 1 or 0 in steps:
        return None
    leaves = {n: torch.stack([c.params[n].detach() for c in clients]).requires_grad_(True) for n in names}
    for k, c in enumerate(clients):
        c.params = {n: leaves[n][k] for n in names}
    return leaves


def clip_stacked(leaves: Sequence[torch.Tensor], max_norm: float) -> None:
    """``clip_per_client`` for ``(K, *shape)`` leaves: client ``k``'s tensors are row ``k``
    of every leaf; its total norm is the norm of its rows' norms, clipped as torch does
    (``max_norm / (total + 1e-6)``, clamped at 1). Two operations per name, not per client."""
    grads = [p.grad for p in leaves if p.grad is not None]
    if not grads:
        return
    k = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(k, -1), 2.0, dim=1) for g in grads], dim=1)  # (K, T)
    coef = torch.clamp(max_norm / (torch.linalg.vector_norm(norms, 2.0, dim=1) + 1e-6), max=1.0)  # (K,)
    for g in grads:
        g.mul_(coef.reshape(k, *([1] * (g.dim() - 1))))


def train_jointly(jobs: Sequence[tuple[Instruction, LocalContext]], kernel: str = "segments") -> list[tuple[Update, State]]:
    """Train the ``local`` learner of every (instruction, context) at once on the shared
    model; returns each client's (Update, trained State), in the order given. ``kernel``:
    how the adapters are applied (``peft/multi_lora.py``: ``segments`` or ``stacked``)."""
    if not jobs:
        return []
    ctx0 = jobs[0][1]
    model, task, tokenizer, cfg = ctx0.model, ctx0.task, ctx0.tokenizer, ctx0.train
    names = trainable_names(model)
    own = dict(model.named_parameters())
    clients: list[_Client] = []
    for inst, ctx in jobs:
        missing, unexpected = sorted(set(names) - set(inst.state)), sorted(set(inst.state) - set(names))
        if missing or unexpected:
            raise KeyError(f"client {ctx.cid}: state does not match the trainable parameters: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        params = {}
        for n in names:
            t = inst.state[n]
            if tuple(t.shape) != tuple(own[n].shape):
                raise ValueError(f"client {ctx.cid}: state['{n}'] has shape {tuple(t.shape)}, expected {tuple(own[n].shape)}")
            params[n] = t.detach().to(own[n].device, own[n].dtype, copy=True).requires_grad_(True)
        stream = client_stream(ctx.examples, cfg, torch.Generator().manual_seed(ctx.seed))
        clients.append(_Client(inst, ctx, params, stream))
    leaves = shared_leaves(clients, names, cfg, kernel)
    # ONE optimizer over every client's tensors: AdamW and SGD are element-wise, so this is
    # each client's own optimizer, in one call per step; a tensor whose grad is None (a
    # client without a batch at this step) is skipped by torch: no momentum, no decay.
    opt = make_optimizer(list(leaves.values()) if leaves else [c.params[n] for c in clients for n in names], cfg)
    torch.manual_seed(ctx0.seed)  # dropout masks of the joint batches (not the sequential ones)
    longest = max(planned_steps(len(c.ctx.examples), cfg) if c.ctx.examples else 0 for c in clients)
    model.train()
    try:
        with AdapterBatch(model, names) as adapters:
            step = 0
            while True:
                active, items = [], []
                for c in clients:
                    b = next(c.stream, None)
                    if b is not None:
                        active.append((c, len(b)))
                        items += b
                if not active:
                    break
                batch = task.collate(items, tokenizer)
                device = batch["input_ids"].device if "input_ids" in batch else torch.device("cpu")
                idx = torch.tensor([k for k, (_, m) in enumerate(active) for _ in range(m)], dtype=torch.long, device=device)
                spans, start = [], 0
                for _, m in active:
                    spans.append((start, start + m))
                    start += m
                adapters.bind([c.params for c, _ in active], idx, spans, kernel, stacked=leaves)
                with autocast(model, cfg.autocast):
                    losses = joint_losses(task, model, batch, spans)
                opt.zero_grad(set_to_none=True)  # every client's grads, idle ones included
                torch.stack(losses).sum().backward()
                if cfg.max_grad_norm is not None and leaves:  # per client, over its own slices
                    clip_stacked(list(leaves.values()), cfg.max_grad_norm)
                elif cfg.max_grad_norm is not None:  # per client, over its own tensors
                    clip_per_client([[c.params[n] for n in names] for c, _ in active], cfg.max_grad_norm)
                for (c, m), loss in zip(active, losses):
                    c.steps += 1
                    c.seen += m
                    c.losses.append(loss.detach())
                opt.step()
                step += 1
                if ctx0.on_step is not None:
                    ctx0.on_step(step, longest)
    finally:
        model.eval()
    out = []
    for c in clients:
        trained = {n: c.params[n].detach().to("cpu", torch.float32, copy=True) for n in names}
        delta = {k: trained[k] - c.inst.state[k].to(trained[k].dtype) for k in trained}
        loss_sum = sum_losses(c.losses)  # one sync per client
        metrics = {"train_loss": loss_sum / max(c.steps, 1), "steps": float(c.steps), "examples_seen": float(c.seen)}
        out.append((Update(cid=c.ctx.cid, payload=delta, num_examples=len(c.ctx.examples), metrics=metrics), trained))
    return out
