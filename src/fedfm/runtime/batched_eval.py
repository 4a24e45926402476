"""Several clients' personalized models evaluated in one forward pass per batch (the
batched transport's ``evaluate`` phase; multi-adapter batching, ``peft/multi_lora.py``).

Per-client evaluation (``eval.clients``, ``federation.client_holdout``) evaluates, for each
client, the broadcast shared State completed with that client's local part on the
client's own held-out slice. Here ``K`` clients are evaluated together: each client's
held-out examples are cut into the same batches as ``Workbench.batches`` would cut them
(sorted by length when ``eval.sort_by_length``, ``eval.batch_size`` per batch); the
``t``-th batches of the ``K`` clients are concatenated, collated once, and run through
the model once under ``torch.inference_mode``, each example with its client's trainable
State. Each client's metrics are then computed by the task's own ``evaluate`` on that
client's slices of the outputs (replayed in order), so the metric formulas are the
sequential ones. The logits come from a wider padded batch, so the metrics may differ from
the sequential ones in the last float digits; accuracy is a count.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fedfm.core.types import State
from fedfm.learners.multi_lora import forward_once, slice_batch, slice_output
from fedfm.peft.multi_lora import AdapterBatch
from fedfm.peft.state import trainable_names


def eval_chunks(wb, items: list[dict]) -> list[list[dict]]:
    """The example lists of ``Workbench.batches(items)``, uncollated."""
    if wb.exp.eval.sort_by_length:
        items = sorted(items, key=lambda e: len(e["input_ids"]))
    bs = wb.exp.eval.batch_size
    return [items[i : i + bs] for i in range(0, len(items), bs)]


class _Replay:
    """A stand-in model that returns precomputed outputs, one per call, in order."""

    def __init__(self, outputs: list[Any]):
        self.outputs = iter(outputs)

    def __call__(self, *args, **kwargs):
        return next(self.outputs)


def evaluate_jointly(wb, states: Sequence[State], items: Sequence[list[dict]], kernel: str = "segments") -> list[dict[str, float]]:
    """Metrics of ``states[k]`` on ``items[k]`` for every k (each list non-empty)."""
    model, task = wb.model, wb.task
    names = trainable_names(model)
    own = dict(model.named_parameters())
    full = []
    for state in states:
        st = wb.full_state(state)
        missing = sorted(set(names) - set(st))
        if missing:
            raise KeyError(f"state does not match the trainable parameters: missing {missing[:3]}")
        full.append({n: st[n].to(own[n].device, own[n].dtype) for n in names})
    chunks = [eval_chunks(wb, it) for it in items]
    outputs: list[list[Any]] = [[] for _ in states]
    batches: list[list[dict]] = [[] for _ in states]
    model.eval()
    with torch.inference_mode(), AdapterBatch(model, names) as adapters:
        for t in range(max(len(c) for c in chunks)):
            active = [k for k in range(len(states)) if t < len(chunks[k])]
            joint = task.collate([e for k in active for e in chunks[k][t]], wb.tokenizer)
            device = joint["input_ids"].device if "input_ids" in joint else torch.device("cpu")
            sizes = [len(chunks[k][t]) for k in active]
            idx = torch.tensor([j for j, m in enumerate(sizes) for _ in range(m)], dtype=torch.long, device=device)
            bounds, start = [], 0
            for m in sizes:
                bounds.append((start, start + m))
                start += m
            adapters.bind([full[k] for k in active], idx, bounds, kernel)
            out = forward_once(task, model, joint)
            n, start = len(idx), 0
            for k, m in zip(active, sizes):
                outputs[k].append(slice_output(out, start, start + m, n))
                batches[k].append(slice_batch(joint, start, start + m, n))
                start += m
    with torch.inference_mode():
        return [task.evaluate(_Replay(outputs[k]), batches[k]) for k in range(len(states))]
