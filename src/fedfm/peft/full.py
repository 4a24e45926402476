"""Full fine-tuning: every parameter trained and shared; the 100% baseline.

``exclude`` (``fnmatch`` patterns of parameter names) keeps some parameters frozen, e.g.
``exclude: ["*embeddings*"]``: every weight of the encoder and the head trained, the
embedding tables (half of MiniLM's parameters) as pre-trained. A pattern that matches no
parameter is refused, naming ``peft.exclude``, and so are patterns that freeze every parameter.
"""

from __future__ import annotations

import fnmatch

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.peft.base import register_tuner


class FullParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of parameters that stay frozen")


def full(model: torch.nn.Module, params: FullParams, task: str) -> torch.nn.Module:
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in params.exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"peft.exclude: {unmatched} match no parameter of the model (e.g. {names[:2]})")
    if params.exclude and all(any(fnmatch.fnmatchcase(n, p) for p in params.exclude) for n in names):
        raise ValueError(f"peft.exclude: {params.exclude} matches every parameter of the model: nothing would train")
    for n, p in model.named_parameters():
        p.requires_grad_(not any(fnmatch.fnmatchcase(n, pat) for pat in params.exclude))
    return model


register_tuner("full", full, FullParams)
