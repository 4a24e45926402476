"""IA3 through ``peft`` (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning"): learned vectors that rescale the keys,
the values and the FFN's inner activations; the State is those vectors plus the task head.

The paper's (IA)^3 adds, per layer, l_k and l_v (one value per key/value feature) and
l_ff (one value per FFN inner unit, applied after the nonlinearity, before the FFN's
output projection): L * (2 * H + I) values for L layers, hidden size H, FFN width I
(for a model with grouped keys/values, 2 * H becomes twice the key/value width).
peft puts a target's vector on its output, or, for a module listed as feed-forward, on
its input, so the paper's placement is: key and value projections as targets, the FFN's
output projection as a target *and* feed-forward.

``target_modules`` / ``feedforward_modules`` default to exactly that placement for the
model families below (``DEFAULT_TARGETS``, regexes that peft matches against the full
module name). peft's own default list is not used: for BERT/RoBERTa it is ["key",
"value", "output.dense"], matched as a name suffix, which also catches the attention
sublayer's ``attention.output.dense`` and rescales the attention output as well (H more
values per layer than the paper); for Gemma 3 it rescales queries instead of keys.
Another model type needs both lists given (names matched as suffixes, peft's rule).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedfm.peft.base import head_modules, register_tuner
from fedfm.peft.freezing import is_head, matches

_BERT = (r".*\.attention\.self\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense")
_DECODER = (r".*\.self_attn\.(k_proj|v_proj)|.*\.mlp\.down_proj", r".*\.mlp\.down_proj")
# model type -> (targets, feed-forward targets): keys, values, FFN output projections.
DEFAULT_TARGETS: dict[str, tuple[str, str]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "llama": _DECODER,
    "gemma3_text": _DECODER,
}


class IA3Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_modules: list[str] | None = Field(
        None, description="default: keys, values and FFN output projections (DEFAULT_TARGETS)"
    )
    feedforward_modules: list[str] | None = None
    train_head: bool = True

    @model_validator(mode="after")
    def _ff_subset(self):
        if (self.target_modules is None) != (self.feedforward_modules is None):
            raise ValueError("give both target_modules and feedforward_modules, or neither")
        if self.target_modules is not None:
            extra = sorted(set(self.feedforward_modules or []) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules")
        return self


def check_suffix_targets(model: torch.nn.Module, targets: list[str], key: str, heads: list[str] | None = None) -> None:
    """Each target matches some module (peft's suffix rule), none is only the task head
    (``heads``: the heads ``train_head`` trains whole, which peft leaves untargeted), and
    every module it names is one IA3 can rescale (linear, Conv2d, transformers' Conv1D)."""
    heads = heads or []
    modules = list(model.named_modules())
    missing = [t for t in targets if not any(matches(n, t) for n, _ in modules)]
    if missing:
        raise ValueError(f"{key}: {missing} match no module of the model")
    for target in targets:
        named = [(n, m) for n, m in modules if matches(n, target) and not is_head(n, heads)]
        if not named:
            raise ValueError(f"{key}: '{target}' names the task head, which peft.train_head trains whole; "
                             "drop it, or set train_head: false")
        for n, m in named:
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and type(m).__name__ != "Conv1D":
                raise ValueError(f"{key}: '{target}' matches '{n}', a {type(m).__name__}; IA3 rescales the "
                                 "outputs (or inputs) of linear layers only (e.g. key, value, output.dense)")


def default_targets(model: torch.nn.Module) -> tuple[str, str]:
    """(targets, feed-forward targets) regexes of the paper's placement for ``model``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"peft.target_modules: no IA3 default for model type '{model_type}' "
            f"(known: {', '.join(DEFAULT_TARGETS)}); give target_modules (keys, values, FFN output "
            "projection) and feedforward_modules (the FFN output projection)"
        )
    return DEFAULT_TARGETS[model_type]


def ia3(model: torch.nn.Module, params: IA3Params, task: str) -> torch.nn.Module:
    from peft import IA3Config, get_peft_model

    if params.target_modules is not None:
        check_suffix_targets(model, params.target_modules, "peft.target_modules",
                             head_modules(model) if params.train_head else [])
        targets, feedforward = params.target_modules, params.feedforward_modules
    else:
        targets, feedforward = default_targets(model)
    config = IA3Config(
        target_modules=targets,
        feedforward_modules=feedforward,
        modules_to_save=head_modules(model) if params.train_head else None,
    )
    return get_peft_model(model, config)


register_tuner("ia3", ia3, IA3Params)
