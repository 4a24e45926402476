"""BitFit: train only the bias terms (Ben Zaken et al. 2022, "BitFit: Simple
Parameter-efficient Fine-tuning for Transformer-based Masked Language-models"); its
federated use is FedBF (Zhang et al. 2023, "FedPETuning: When Federated Learning Meets
the Parameter-Efficient Tuning Methods of Pre-trained Language Models").

Written by hand because ``peft`` has no BitFit tuner: it is only a choice of which
existing parameters keep ``requires_grad``, so the State is every bias (and the task
head), and nothing is added to the model.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from fedfm.peft.base import register_tuner
from fedfm.peft.freezing import freeze_all, train_heads


class BitFitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_layernorm: bool = True  # BitFit trains LayerNorm biases too
    train_head: bool = True


def is_layernorm_bias(name: str, model: torch.nn.Module) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()


def bitfit(model: torch.nn.Module, params: BitFitParams, task: str) -> torch.nn.Module:
    freeze_all(model)
    chosen = 0
    for name, p in model.named_parameters():
        if name.split(".")[-1] != "bias":
            continue
        if not params.include_layernorm and is_layernorm_bias(name, model):
            continue
        p.requires_grad_(True)
        chosen += 1
    if chosen == 0:
        if any(name.split(".")[-1] == "bias" for name, _ in model.named_parameters()):
            raise ValueError("peft.include_layernorm: false leaves bitfit nothing to train: the model's only biases "
                             "are its norms'; set it to true or use another peft.method")
        raise ValueError(f"peft.method bitfit: {type(model).__name__} has no bias parameters to train "
                         "(e.g. Llama-style models); use lora, ia3 or adapter")
    if params.train_head:
        train_heads(model)
    return model


register_tuner("bitfit", bitfit, BitFitParams)
