"""An attention adapter on the features the task head reads: FedCLIP's adapter (Lu et al.
2023, "FedCLIP: Fast Generalization and Personalization for CLIP in Federated Learning"),
on a text encoder. FedCLIP-inspired, not FedCLIP: see below.

FedCLIP keeps CLIP frozen and trains (and sends) only an attention adapter on the image
features ``f`` (d-dimensional): ``a = softmax(W2 tanh(W1 f + b1) + b2)`` over the d
feature dimensions, then ``f' = a * f`` (elementwise), which it L2-normalises and compares
with CLIP's frozen text embeddings of the class names. Here the same adapter sits on the
input of the task head (``classifier``: BERT's pooled ``[CLS]`` state; ``score``: a
decoder's hidden states, per position), ``f' = a * f``, L2-normalised when ``normalize``
(the default, as FedCLIP does before its similarity), and the head is a trained linear
layer: a text encoder has no paired text tower of class-name embeddings to compare with,
so FedCLIP's zero-shot similarity head is not implemented. The adapter (2 d (d + 1)
values) and the head travel; the encoder is frozen. The adapter starts at PyTorch's
default init (so, unlike LoRA or the bottleneck adapters, round 0 is not the base model's
output). Written by hand: ``peft`` has no such adapter.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.peft.base import head_modules, register_tuner
from fedfm.peft.freezing import freeze_all, train_heads


class FeatureAttentionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
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


def feature_attention(model: torch.nn.Module, params: FeatureAttentionParams, task: str) -> torch.nn.Module:
    heads = head_modules(model)
    if not heads:
        raise ValueError(f"peft.method feature_attention needs a task head (classifier or score); {type(model).__name__} has none")
    head = model.get_submodule(heads[0])
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"peft.method feature_attention: the head '{heads[0]}' is a {type(head).__name__}, not a linear layer")
    freeze_all(model)
    model.feature_attention = FeatureAttention(head.in_features, params.normalize)
    head.register_forward_pre_hook(lambda module, args: (model.feature_attention(args[0]), *args[1:]))
    if params.train_head:
        train_heads(model)
    return model


register_tuner("feature_attention", feature_attention, FeatureAttentionParams)
