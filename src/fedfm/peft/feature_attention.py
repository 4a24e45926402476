"""An attention adapter on the features the task head reads: FedCLIP's adapter (Lu et al.
2023, "FedCLIP: Fast Generalization and Personalization for CLIP in Federated Learning"),
on a text encoder. FedCLIP-inspired, not FedCLIP: see below.

FedCLIP keeps CLIP frozen and trains (and sends) only an attention adapter on the image
features ``f`` (d-dimensional): ``a = softmax(W2 tanh(W1 f + b1) + b2)`` over the d
feature dimensions, then ``f' = a * f`` (elementwise), which it L2-normalises and compares
with CLIP's frozen text embeddings of the class names. Here the same adapter sits on the
input of the task head, ``f' = a * f``, L2-normalised when ``normalize``
(the default, as FedCLIP does before its similarity), and the head is a trained linear
layer: a text encoder has no paired text tower of class-name embeddings to compare with,
so FedCLIP's zero-shot similarity head is not implemented. ``f`` is, with ``features:
mean`` (the default), the encoder's mean of its last hidden states over the real tokens,
put in place of BERT's pooled ``[CLS]`` state: the sentence embedding a sentence encoder
such as all-MiniLM-L6-v2 was trained to produce (its pooler was not), as CLIP's image
embedding is what FedCLIP attends to; ``features: head_input`` keeps what the head reads
anyway (BERT's pooler output; a decoder's hidden state per position). The adapter (2 d (d + 1)
values) and the head travel; the encoder is frozen. The adapter starts at PyTorch's
default init (so, unlike LoRA or the bottleneck adapters, round 0 is not the base model's
output). Written by hand: ``peft`` has no such adapter. ``features: mean`` is refused with
``train.unpad`` / ``eval.unpad``, whose last layer computes the first token only
(``feature_attention_problem``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.peft.base import head_modules, register_tuner
from fedfm.peft.freezing import freeze_all, train_heads


class FeatureAttentionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    features: Literal["mean", "head_input"] = Field(
        "mean", description="mean: the encoder's masked mean of its last hidden states (a sentence embedding) "
        "replaces the pooled [CLS] state; head_input: what the head reads anyway")
    normalize: bool = Field(True, description="L2-normalise the attended features before the head (as FedCLIP)")
    train_head: bool = True


class FeatureAttention(torch.nn.Module):
    """``a * f`` with ``a = softmax(W2 tanh(W1 f))`` over the last dimension."""

    def __init__(self, dim: int, normalize: bool):
        super().__init__()
        self.attend = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Tanh(), torch.nn.Linear(dim, dim),
                                          torch.nn.Softmax(dim=-1))
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.attend(features) * features  # (..., d)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out


def mean_pooled(encoder: torch.nn.Module) -> None:
    """Make ``encoder``'s ``pooler_output`` the mean of its last hidden states over the real
    tokens (``attention_mask``; all positions when none is given), as a sentence encoder."""

    def hook(module, args, kwargs, output):
        h = output.last_hidden_state  # (B, T, H)
        mask = kwargs.get("attention_mask")
        m = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device) if mask is None else mask.to(h.dtype)
        output["pooler_output"] = (h * m.unsqueeze(-1)).sum(dim=1) / m.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, H)
        return output

    encoder.register_forward_hook(hook, with_kwargs=True)


def feature_attention(model: torch.nn.Module, params: FeatureAttentionParams, task: str) -> torch.nn.Module:
    heads = head_modules(model)
    if not heads:
        raise ValueError(f"peft.method feature_attention needs a task head (classifier or score); {type(model).__name__} has none")
    head = model.get_submodule(heads[0])
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"peft.method feature_attention: the head '{heads[0]}' is a {type(head).__name__}, not a linear layer")
    freeze_all(model)
    if params.features == "mean":
        encoder = model.base_model
        if encoder is model or "pooler" not in dict(encoder.named_children()):
            raise ValueError(f"peft.features: mean needs an encoder with a pooled output (BERT-style); "
                             f"{type(model).__name__} has none: use features: head_input")
        mean_pooled(encoder)
    model.feature_attention = FeatureAttention(head.in_features, params.normalize)
    head.register_forward_pre_hook(lambda module, args: (model.feature_attention(args[0]), *args[1:]))
    if params.train_head:
        train_heads(model)
    return model


register_tuner("feature_attention", feature_attention, FeatureAttentionParams)


def feature_attention_problem(exp) -> str | None:
    """``features: mean`` reads every token's last hidden state; padding-free BERT computes
    the last layer for the first token only when the head reads nothing else."""
    if exp.peft.method != "feature_attention" or exp.peft.params().get("features", "mean") != "mean":
        return None
    on = [f for f, v in (("train.unpad", exp.train.unpad), ("eval.unpad", exp.eval.unpad)) if v]
    if on:
        return (f"{on[0]}: peft.method feature_attention with features: mean reads every token's last hidden "
                "state, which padding-free BERT computes for the first token only; turn it off or use features: head_input")
    return None
