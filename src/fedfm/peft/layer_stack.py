"""The model's transformer layer stack, and the model run with some of its layers only.

Two techniques train a client model made of some of the global model's layers: FedBFPT's
local model (``personalize/fedbfpt.py``: the layers 0..l and sampled deeper ones) and
FedRA's sub-model (``learners/fedra.py``: the layers the round's allocation gives the
client). Both keep the one base model in memory and swap the stack (``nn.ModuleList``
named ``layer``, BERT's ``encoder.layer``, or ``layers``, Llama's ``model.layers``) for a
ModuleList of the kept layers, in the given order, for the duration of the client's
training; the embeddings and the head stay. The forward pass then runs the kept layers
only: the compute and the activations of the others are saved, not only their weight
gradients. Written by hand: neither transformers nor peft builds a model from a subset of
another's layers that shares its weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


def layer_stack(model: torch.nn.Module, who: str) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent, attribute, ModuleList) of the transformer layers (``.layer`` or ``.layers``)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layer", "layers"):
            parent_name, _, attr = name.rpartition(".")
            return (model.get_submodule(parent_name) if parent_name else model), attr, module
    raise ValueError(f"{who}: the model has no layer stack (a ModuleList named 'layer' or 'layers')")


def stack_size(model: torch.nn.Module, who: str) -> int:
    """How many transformer layers the model's stack holds, frozen ones included (the count
    FedRA allocates among and SplitFed cuts in; ``ServerPart.bind_model``)."""
    return len(layer_stack(model, who)[2])


@contextmanager
def trainable_only(model: torch.nn.Module, train: Iterable[int]) -> Iterator[None]:
    """Only the parameters whose ids are in ``train`` trainable (out of the optimizer and of
    the weight gradients); every ``requires_grad`` flag restored after."""
    train = set(train)
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in train]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@contextmanager
def kept_layers(model: torch.nn.Module, keep: list[int], train: Iterable[int], who: str) -> Iterator[None]:
    """The model with only the ``keep`` layers (in that order, a layer may repeat) and only the
    parameters whose ids are in ``train`` trainable; the full stack and every
    ``requires_grad`` flag restored after."""
    parent, attr, full = layer_stack(model, who)
    with trainable_only(model, train):  # before the swap: the left-out layers' flags too
        setattr(parent, attr, torch.nn.ModuleList([full[i] for i in keep]))
        try:
            yield
        finally:
            setattr(parent, attr, full)


__all__ = ["kept_layers", "layer_stack", "trainable_only"]
