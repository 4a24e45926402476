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

``prompt_tuning``'s ``init`` picks p_0, the prompt before any training: ``sample_vocab``
(the default) copies the word embeddings of P random vocabulary tokens;
``random`` leaves ``torch.nn.Embedding``'s N(0, 1) init; ``text`` (peft's
``PromptTuningInit.TEXT``; Lester et al.'s class-label init is the case of a text made of
the label words) copies the word embeddings of ``init_text``'s tokens. peft tokenizes the text with the model's own
tokenizer as ``tokenizer(init_text)["input_ids"]`` (so with whatever special tokens that
tokenizer adds: SmolLM2's adds none, a BERT tokenizer adds ``[CLS]`` and ``[SEP]``) and
fits the n ids to P rows: n > P keeps the first P; n < P repeats the ids (``ids * ceil(P /
n)``) and keeps the first P, so "a b c" with P = 5 gives rows a b c a b. The tokenizer is
read from the model's directory (``model.config._name_or_path``, which ``from_pretrained``
and ``AutoConfig.from_pretrained`` set to the directory ``tasks/loading.model_dir`` gave:
``model.path``, or for a packaged GGUF model its converted cache folder, which holds the
tokenizer files), offline; a model with no such directory is refused.

Every soft prompt takes P positions of the model's position table
(``tasks/limits.py`` checks ``data.max_length + P``). peft has no soft prompt for masked
LMs (``model.task: masked_lm``): the three tuners refuse it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fedfm.peft.base import head_modules, register_tuner


class PromptTuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(20, ge=1)
    init: Literal["sample_vocab", "random", "text"] = Field(
        "sample_vocab", description="p_0: embeddings of random vocabulary tokens, N(0, 1), or of init_text's tokens"
    )
    init_text: str | None = Field(
        None, validate_default=True,
        description="with init text: the text whose token embeddings start the prompt (its tokens repeated or cut "
                    "to num_virtual_tokens)",
    )

    @field_validator("init_text")
    @classmethod
    def _text_with_text_init(cls, value: str | None, info: ValidationInfo) -> str | None:
        init = info.data.get("init")
        if init is None:  # init itself failed validation; that error is reported
            return value
        if init == "text" and value is None:
            raise ValueError("init: text needs the text whose tokens start the prompt, e.g. init_text: 'Negative or positive?'")
        if init != "text" and value is not None:
            raise ValueError(f"init_text is only read with init: text (init is {init}); set peft.init: text or drop peft.init_text")
        if value == "":
            raise ValueError("empty; give the text whose tokens start the prompt")
        return value


class PrefixTuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(20, ge=1)
    projection: bool = Field(False, description="reparameterize through an MLP (Li and Liang); off = P-tuning v2")
    encoder_hidden_size: int = Field(128, ge=1, description="MLP width when projection is on")

    @model_validator(mode="after")
    def _width_with_projection(self):
        if "encoder_hidden_size" in self.model_fields_set and not self.projection:
            raise ValueError("encoder_hidden_size is the width of the projection MLP, which projection: false "
                             "(P-tuning v2) does not have; set projection: true or drop encoder_hidden_size")
        return self


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


def tokenizer_dir(model: torch.nn.Module) -> Path:
    """The directory the model was loaded from (its config's ``_name_or_path``), which
    must hold the tokenizer: ``init: text`` reads the tokenizer from it, offline."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(name)
    if not name or not path.is_dir():
        raise ValueError(
            f"peft.init_text: the model has no local directory to read its tokenizer from (name_or_path {name!r}); "
            "use peft.init sample_vocab or random"
        )
    return path


def text_token_ids(directory: Path, text: str, vocab_size: int) -> list[int]:
    """``tokenizer(text)["input_ids"]`` as peft computes them, checked before peft uses them."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(directory)(text)["input_ids"]
    if not ids:
        raise ValueError(f"peft.init_text: {text!r} gives no tokens")
    if max(ids) >= vocab_size:
        raise ValueError(f"peft.init_text: token id {max(ids)} is outside the model's {vocab_size} word embeddings")
    return ids


def prompt_tuning(model: torch.nn.Module, params: PromptTuningParams, task: str) -> torch.nn.Module:
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    kind = task_type(model, "prompt_tuning", task)
    text = {}
    if params.init == "text":
        directory = tokenizer_dir(model)
        text_token_ids(directory, params.init_text, model.get_input_embeddings().num_embeddings)
        text = {"prompt_tuning_init_text": params.init_text, "tokenizer_name_or_path": str(directory)}
    init = {"sample_vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM,
            "text": PromptTuningInit.TEXT}[params.init]
    config = PromptTuningConfig(
        task_type=kind, num_virtual_tokens=params.num_virtual_tokens, prompt_tuning_init=init, **text,
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
