"""Soft prompts through ``peft``: prompt tuning (Lester et al. 2021, "The Power of Scale
for Parameter-Efficient Prompt Tuning"; federated as PromptFL, Guo et al. 2023), prefix
tuning (Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation") whose projection-free, every-layer form is P-tuning v2 (Liu et al. 2022,
"P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales
and Tasks"), and P-tuning (Liu et al. 2021, "GPT Understands, Too": prompts produced by
a small MLP/LSTM encoder).

The peft task type follows the model: a model with a classification head gets
``SEQ_CLS``, so peft keeps the head trainable (``modules_to_save``) next to the prompt,
and it is shared like the prompt. Transformers 5 renamed the encoders' keyword
``past_key_values`` to ``cache``; peft 0.21 looks for the old name in the forward
signature before it hands prefix key/values over, so ``accept_past_key_values`` gives
such a model a forward that takes the old name and passes it on as ``cache``.

Where the prompt sits, on an encoder classifier (``SEQ_CLS``): peft's prompt tuning and
P-tuning *prepend* the P virtual tokens to the input embeddings, before ``[CLS]``, so the
sequence is ``p_1 .. p_P [CLS] w_1 .. w_T`` with the soft tokens at positions 0 .. P-1.
BERT's pooler, and so the classifier, reads position 0: the first *soft token's* hidden
state, not ``[CLS]``'s (``tests/test_peft_prompt_positions.py`` checks this). Lester et al.
prepend the prompt too, but classify with a text-to-text decoder, where no position is
special; fedfm keeps peft's layout (the hand-written ``personal_prompt``, ``fedapt`` and
``diprompt`` insert their prompts after ``[CLS]`` instead). Prefix tuning adds keys and
values only, so ``[CLS]`` stays at position 0 (its position id is P, after the prefix).
On a causal LM the prompt precedes the text, as in the papers.

Every soft prompt takes P positions of the model's position table
(``tasks/limits.py`` checks ``data.max_length + P``). peft has no soft prompt for masked
LMs (``model.task: masked_lm``): the three tuners refuse it.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.peft.base import head_modules, register_tuner


class PromptTuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(20, ge=1)
    init: Literal["sample_vocab", "random"] = "sample_vocab"


class PrefixTuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(20, ge=1)
    projection: bool = Field(False, description="reparameterize through an MLP (Li and Liang); off = P-tuning v2")
    encoder_hidden_size: int = Field(128, ge=1, description="MLP width when projection is on")


class PTuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(20, ge=1)
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: int = Field(128, ge=1)


def task_type(model: torch.nn.Module, method: str, task: str):
    from peft import TaskType

    if task == "masked_lm":
        raise ValueError(
            f"peft.method {method}: model.task masked_lm is not supported (peft's soft prompts have no "
            "masked-LM model); use lora, ia3, adapter, bitfit or full"
        )
    return TaskType.SEQ_CLS if head_modules(model) else TaskType.CAUSAL_LM


def accept_past_key_values(model: torch.nn.Module) -> None:
    """Let ``model.forward`` take ``past_key_values`` (passed on as ``cache``)."""
    params = inspect.signature(model.forward).parameters
    if "past_key_values" in params:
        return
    original = model.forward

    def forward(input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        return original(input_ids=input_ids, attention_mask=attention_mask, cache=past_key_values, **kwargs)

    model.forward = forward


def prompt_tuning(model: torch.nn.Module, params: PromptTuningParams, task: str) -> torch.nn.Module:
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    init = PromptTuningInit.SAMPLE_VOCAB if params.init == "sample_vocab" else PromptTuningInit.RANDOM
    config = PromptTuningConfig(
        task_type=task_type(model, "prompt_tuning", task), num_virtual_tokens=params.num_virtual_tokens,
        prompt_tuning_init=init,
    )
    return get_peft_model(model, config)


def prefix_tuning(model: torch.nn.Module, params: PrefixTuningParams, task: str) -> torch.nn.Module:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    kind = task_type(model, "prefix_tuning", task)
    if kind == TaskType.SEQ_CLS:
        accept_past_key_values(model)
    config = PrefixTuningConfig(
        task_type=kind,
        num_virtual_tokens=params.num_virtual_tokens,
        prefix_projection=params.projection,
        encoder_hidden_size=params.encoder_hidden_size,
    )
    return get_peft_model(model, config)


def p_tuning(model: torch.nn.Module, params: PTuningParams, task: str) -> torch.nn.Module:
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, get_peft_model

    encoder = PromptEncoderReparameterizationType[params.encoder.upper()]
    config = PromptEncoderConfig(
        task_type=task_type(model, "p_tuning", task),
        num_virtual_tokens=params.num_virtual_tokens,
        encoder_reparameterization_type=encoder,
        encoder_hidden_size=params.encoder_hidden_size,
    )
    return get_peft_model(model, config)


register_tuner("prompt_tuning", prompt_tuning, PromptTuningParams)
register_tuner("prefix_tuning", prefix_tuning, PrefixTuningParams)
register_tuner("p_tuning", p_tuning, PTuningParams)
