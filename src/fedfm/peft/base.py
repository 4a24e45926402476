"""The tuner registry: WHAT IS TRAINED.

A tuner is a function ``apply(model, params, task) -> model`` that freezes the base
model and makes its own parameters trainable; ``peft.method`` picks one by name.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import BaseModel

from fedfm.core.registry import NoParams, Registry

Tuner = Callable[[torch.nn.Module, BaseModel, str], torch.nn.Module]
tuners: Registry[Tuner] = Registry("peft.method")

# Names of task heads that stay trainable (and shared) next to a tuner's own parameters.
HEAD_MODULES = ("classifier", "score")


def register_tuner(name: str, fn: Tuner, params: type[BaseModel] = NoParams) -> Tuner:
    return tuners.register(name, fn, params)


def head_modules(model: torch.nn.Module) -> list[str]:
    """Top-level task heads present on ``model`` (e.g. BERT's ``classifier``)."""
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    return [h for h in HEAD_MODULES if h in names]


def apply_tuner(model: torch.nn.Module, spec, task: str) -> torch.nn.Module:
    params = tuners.parse(spec.method, spec.params(), "peft")
    return tuners.get(spec.method).obj(model, params, task)
