"""Speed switches of the local training loop (``train.autocast``, ``train.compile``,
``train.bucket_by_length``, ``train.unpad``; docs/speed.md).

- ``autocast: bf16``: the forward pass (and so the loss) runs under
  ``torch.autocast(device_type, torch.bfloat16)`` (Micikevicius et al. 2018, "Mixed
  Precision Training", with bfloat16 instead of float16 and no loss scaling, which bf16's
  exponent range makes unnecessary). Parameters, gradients and optimizer state stay float32.
  It changes the float math: results differ from float32 training.
- ``compile: true``: the model's forward is wrapped once per process with
  ``torch.compile(model, dynamic=True)`` (Ansel et al. 2024, "PyTorch 2: Faster Machine
  Learning Through Dynamic Python Bytecode Transformation and Graph Compilation"). The
  first compiled step's wall time (compilation included) is logged and returned as
  ``compile_s``. Fused kernels may round differently from eager ones.
- ``bucket_by_length: true``: a "sortish" sampler: the seeded permutation is cut into
  pools of ``POOL_BATCHES`` batches, each pool is sorted by length and cut into batches,
  and the batches are shuffled (seeded). Less padding, but batch composition changes, so
  results differ from the default batches.

- ``unpad: true``: BERT encoders compute on real tokens only (``learners/unpad.py``).

Only learners that train with ``learners.loop.train_loop`` honour them; the others are
refused at config time (``NOT_HONOURED``, checked in ``fedfm.components``).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Iterator

import torch

log = logging.getLogger("fedfm.learners")

POOL_BATCHES = 16
# Learners with their own loop, which the switches would silently not reach.
NOT_HONOURED = ("split", "splitfed", "mezo", "fedkseed", "fedbpt", "bdpl", "dp_sgd")
# The built-in learners that train with ``train_loop`` (tests/test_audit_speed.py checks
# that every built-in learner is in one of the two lists).
HONOURED = ("local", "fedprox", "feddyn", "scaffold", "hetlora", "flexlora", "fedra", "ifca", "feddat",
            "fedbfpt", "fedapt", "diprompt", "flash", "prunefl", "update_clusters")
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def speed_problem(exp) -> str | None:
    """A speed switch on a learner that does not use ``train_loop``; None when fine."""
    on = [k for k, v in (("autocast", exp.train.autocast), ("compile", exp.train.compile),
                         ("bucket_by_length", exp.train.bucket_by_length), ("unpad", exp.train.unpad)) if v]
    if exp.train.unpad and exp.train.compile:
        return "train.unpad and train.compile cannot be combined (the unpadded encoder is not compiled); turn one off"
    if on and exp.learner.name in NOT_HONOURED:
        return (f"train.{on[0]}: learner '{exp.learner.name}' trains with its own loop, which does not "
                f"apply train.{', train.'.join(on)}; turn it off or use a gradient learner (local, fedprox, ...)")
    return None


def autocast(model: torch.nn.Module, mode: str | None):
    """The forward context of ``train.autocast``: bf16 autocast on the model's device, or nothing."""
    if mode is None:
        return contextlib.nullcontext()
    if mode != "bf16":
        raise ValueError(f"train.autocast must be bf16 or null, got '{mode}'")
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def compiled(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """(the compiled model, whether it was compiled just now); one compilation per model and process."""
    if model in _COMPILED:
        return _COMPILED[model], False
    _COMPILED[model] = torch.compile(model, dynamic=True)
    return _COMPILED[model], True


def bucketed(examples: list[dict[str, Any]], batch_size: int, generator: torch.Generator) -> Iterator[list[dict]]:
    """Batches of similar length: seeded permutation, pools sorted by length, batches shuffled."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    pool = batch_size * POOL_BATCHES
    cut: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: len(examples[i]["input_ids"]))
        cut += [chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size)]
    for b in torch.randperm(len(cut), generator=generator).tolist():
        yield [examples[i] for i in cut[b]]
