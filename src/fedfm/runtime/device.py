"""Where the one base model runs: ``runtime.device`` (cpu | cuda | auto).

The model (base weights and tuner) is moved to the device once, in the workbench; every
batch the task collates is moved there too (``DeviceTask``), so learners, evaluation and
attacks need not know the device. States stay on the CPU in float32 everywhere else:
``peft.state.get_state`` copies to the CPU, ``set_state`` copies to the parameter's
device, so codecs, the client store, aggregation and checkpoints never see a GPU tensor.

``auto`` picks CUDA when ``torch.cuda.is_available()``; ``cuda`` without a GPU is an
error naming the key, raised before the model loads.
"""

from __future__ import annotations

from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    """``runtime.device`` as a torch device; cuda without a GPU raises, naming the key."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but torch finds no CUDA device here; use cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"runtime.device must be cpu, cuda or auto, got '{name}'")
    return torch.device(name)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``; everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class DeviceTask:
    """A task whose ``collate`` puts its batches on ``device``; all else is the task's."""

    def __init__(self, task: Any, device: torch.device):
        object.__setattr__(self, "_task", task)
        object.__setattr__(self, "device", device)

    def collate(self, examples, tokenizer):
        return to_device(self._task.collate(examples, tokenizer), self.device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._task, name, value)
