"""IA3 through ``peft`` (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning"): learned vectors that rescale the keys,
values and the FFN activations; the State is those vectors plus the task head.

``target_modules`` / ``feedforward_modules`` default to peft's own choice for the model
type (for BERT: key, value and output.dense; output.dense counted as feed-forward).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedfm.peft.base import head_modules, register_tuner
from fedfm.peft.freezing import matches


class IA3Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_modules: list[str] | None = Field(None, description="default: peft's list for the model type")
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


def check_suffix_targets(model: torch.nn.Module, targets: list[str], key: str) -> None:
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(matches(n, t) for n in names)]
    if missing:
        raise ValueError(f"{key}: {missing} match no module of the model")


def ia3(model: torch.nn.Module, params: IA3Params, task: str) -> torch.nn.Module:
    from peft import IA3Config, get_peft_model

    if params.target_modules is not None:
        check_suffix_targets(model, params.target_modules, "peft.target_modules")
    config = IA3Config(
        target_modules=params.target_modules,
        feedforward_modules=params.feedforward_modules,
        modules_to_save=head_modules(model) if params.train_head else None,
    )
    return get_peft_model(model, config)


register_tuner("ia3", ia3, IA3Params)
