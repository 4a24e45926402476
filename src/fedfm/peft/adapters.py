"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning
for NLP"), and an FFN-only variant inspired by Pfeiffer et al. 2021 ("AdapterFusion:
Non-Destructive Task Composition for Transfer Learning"); federated as FedAP (Zhang et
al. 2023, "FedPETuning").

Written by hand because ``peft`` has no bottleneck adapter, and AdapterHub's
``adapters`` package works by patching the model classes of the transformers 4 line it
pins, not the transformers 5 used here. An adapter is ``h + up(act(down(h)))``; the
bottleneck width is ``hidden // reduction_factor``. ``up`` starts at zero, so the adapted
model computes exactly what the base model does until it is trained.

- ``variant: houlsby`` (Houlsby et al.): one adapter after the attention sublayer's output
  projection, one after the FFN's, each before that sublayer's residual addition and
  LayerNorm. On BERT, RoBERTa and XLM-R (``HIDDEN_DROPOUT``) the sublayer's hidden dropout
  comes first: projection -> dropout -> adapter -> LayerNorm(. + residual), as in the
  authors' adapter-bert code (the dropout module moves into the wrapper, the sublayer's
  own slot becomes an identity). Llama and Gemma 3 have no dropout there: projection ->
  adapter -> residual addition. Houlsby et al. train the adapters, the LayerNorms and the
  head, so ``train_layernorm`` defaults to true for this variant (every
  ``torch.nn.LayerNorm`` of the model, embeddings' included, as adapter-bert does; a
  decoder's RMSNorm is not a ``LayerNorm`` and stays frozen).
- ``variant: pfeiffer`` (Pfeiffer-inspired, not Pfeiffer et al.'s adapter): one adapter
  after the FFN only, the placement AdapterFusion picked, but in the same slot as
  Houlsby's FFN adapter (after the dropout, *before* the FFN's Add & Norm). Pfeiffer et al.
  place it *after* the FFN's Add & Norm, on its normalised output, with its own residual
  and a second Add & Norm after it; that is not what this computes. ``train_layernorm``
  defaults to false for this variant (AdapterFusion trains only the adapters and head).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedfm.peft.base import head_modules, register_tuner
from fedfm.peft.freezing import freeze_all, is_head, set_submodule, train_heads

# Output projections of the attention and FFN sublayers, by model type.
SUBLAYERS: dict[str, tuple[str, str]] = {
    "bert": (r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"),
    "roberta": (r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"),
    "xlm-roberta": (r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"),
    "llama": (r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"),
    "gemma3_text": (r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"),
}
# Model types whose output projections are followed by a hidden dropout module ``dropout`` in
# the same parent (BertSelfOutput, BertOutput, ...): dense -> dropout -> LayerNorm(. + input).
HIDDEN_DROPOUT = ("bert", "roberta", "xlm-roberta")
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh}


class AdapterParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction_factor: int = Field(16, ge=1, description="bottleneck = hidden // reduction_factor")
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    init_std: float = Field(0.01, ge=0, allow_inf_nan=False, description="std of the down projection's normal init")
    attn_pattern: str | None = Field(None, description="regex of attention output projections")
    ffn_pattern: str | None = Field(None, description="regex of FFN output projections")
    train_layernorm: bool | None = Field(
        None, description="train every LayerNorm; default: true for peft.method adapter, variant houlsby (as Houlsby et al.), else false"
    )
    train_head: bool = True

    @model_validator(mode="after")
    def _attn_with_houlsby(self):
        if self.attn_pattern is not None and self.variant == "pfeiffer":
            raise ValueError("attn_pattern places the attention adapter, which variant pfeiffer (FFN only) does not "
                             "have; use variant houlsby or drop attn_pattern")
        return self

    @field_validator("attn_pattern", "ffn_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc}): {value!r}") from None
        return value


class Bottleneck(torch.nn.Module):
    def __init__(self, hidden: int, bottleneck: int, activation: str, init_std: float):
        super().__init__()
        self.down = torch.nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = torch.nn.Linear(bottleneck, hidden)
        torch.nn.init.normal_(self.down.weight, std=init_std)
        torch.nn.init.zeros_(self.down.bias)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H)
        return h + self.up(self.act(self.down(h)))  # (B, T, H)


class AdaptedLinear(torch.nn.Module):
    """A frozen output projection, the sublayer's hidden dropout where it has one, then
    the adapter."""

    def __init__(self, base: torch.nn.Linear, adapter: Bottleneck, dropout: torch.nn.Module | None = None):
        super().__init__()
        self.base = base
        self.dropout = dropout if dropout is not None else torch.nn.Identity()
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in)
        return self.adapter(self.dropout(self.base(x)))  # (B, T, H)


def take_hidden_dropout(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The hidden dropout that follows the output projection ``name`` in its parent (BERT's
    ``*.output.dense`` -> ``*.output.dropout``), replaced there by an identity so that it
    runs once, inside the wrapper, before the adapter; None where the model has none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    parent_name, _, child = name.rpartition(".")
    if model_type not in HIDDEN_DROPOUT or child != "dense" or not parent_name.endswith("output"):
        return None
    parent = model.get_submodule(parent_name)
    dropout = getattr(parent, "dropout", None)
    if not isinstance(dropout, torch.nn.Dropout):
        return None
    parent.dropout = torch.nn.Identity()
    return dropout


def sublayer_patterns(model: torch.nn.Module, params: AdapterParams) -> list[tuple[str, str]]:
    """[(yaml key, regex)] of the placements this variant uses."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = SUBLAYERS.get(model_type or "")
    attn = params.attn_pattern or (default[0] if default else None)
    ffn = params.ffn_pattern or (default[1] if default else None)
    wanted = [("peft.ffn_pattern", ffn)]
    if params.variant == "houlsby":
        wanted.insert(0, ("peft.attn_pattern", attn))
    for key, pattern in wanted:
        if pattern is None:
            raise ValueError(
                f"{key}: no default placement for model type '{model_type}' "
                f"(known: {', '.join(SUBLAYERS)}); give the regex of its output projections"
            )
    return wanted  # type: ignore[return-value]


def adapter_targets(model: torch.nn.Module, params: AdapterParams) -> list[str]:
    heads = head_modules(model)
    names: list[str] = []
    for key, pattern in sublayer_patterns(model, params):
        regex = re.compile(pattern)
        hit = [
            n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and regex.search(n) and not is_head(n, heads)
        ]
        if not hit:
            raise ValueError(f"{key}: '{pattern}' matches no linear module of the model")
        names += hit
    for name in names:
        width = model.get_submodule(name).out_features
        if width // params.reduction_factor == 0:
            raise ValueError(f"peft.reduction_factor: {params.reduction_factor} exceeds the width {width} of '{name}': "
                             f"the bottleneck {width} // {params.reduction_factor} would be 0; use at most {width}")
    return sorted(set(names))


def adapters(model: torch.nn.Module, params: AdapterParams, task: str) -> torch.nn.Module:
    freeze_all(model)
    for name in adapter_targets(model, params):
        base = model.get_submodule(name)
        hidden = base.out_features
        width = max(1, hidden // params.reduction_factor)
        adapter = Bottleneck(hidden, width, params.activation, params.init_std)
        adapter.to(base.weight.device, base.weight.dtype)
        set_submodule(model, name, AdaptedLinear(base, adapter, take_hidden_dropout(model, name)))
    return train_extras(model, params, layernorm_default=params.variant == "houlsby")


def train_extras(model: torch.nn.Module, params: AdapterParams, layernorm_default: bool = False) -> torch.nn.Module:
    """Unfreeze what an adapter method trains beside its adapters: the LayerNorms
    (``train_layernorm``; ``layernorm_default`` when it is not set) and the task head
    (``train_head``)."""
    layernorm = params.train_layernorm if params.train_layernorm is not None else layernorm_default
    if layernorm:
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.requires_grad_(True)
    if params.train_head:
        train_heads(model)
    return model


register_tuner("adapter", adapters, AdapterParams)
