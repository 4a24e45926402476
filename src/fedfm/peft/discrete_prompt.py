"""A discrete prompt learned as a distribution: BDPL's prompt (Diao et al. 2022, "Black-box
Prompt Learning for Pre-trained Language Models"), for the black-box learner ``bdpl``.

``peft: {method: discrete_prompt, length: n, candidates: K}``: the prompt is ``n`` real
vocabulary tokens inserted after the first token (``[CLS]``) of every input (on a causal
LM, ``model.task: lm_classification``, which has no ``[CLS]``: right before each row's
first real token, so at the start of a right-padded row and after a left-padded row's
pads, with position ids recounted when the caller passes them); position
``i`` holds one of ``K`` candidate tokens, chosen by a categorical distribution ``p_i``.
The trainable State is those distributions, ``discrete_prompt.probs`` (n, K), uniform at
the start (BDPL's init); the model a client or the server evaluates uses the most likely
token per position (argmax, ties to the lower candidate). Nothing else of the model is
trained or travels: the task head stays as the model has it, as with ``fedbpt``.

Candidates: BDPL picks them by PMI among n-grams of the training text, which no party
of a federation holds; here they are ``K`` distinct vocabulary ids drawn with
``candidate_seed`` from ``[min_id, vocabulary size)`` (default ``min_id`` 1000 skips BERT's
``[unused]`` and special tokens), the same for every client and the server, public like the
vocabulary. Written by hand: ``peft`` has no discrete prompts.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.core.seeding import derive_seed
from fedfm.peft.base import register_tuner
from fedfm.peft.freezing import freeze_all

CANDIDATE_TAG = 0xD15C
PROBS = "discrete_prompt.probs"


class DiscretePromptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    length: int = Field(10, ge=1, description="n: prompt tokens inserted after the first token")
    candidates: int = Field(200, ge=2, description="K: candidate tokens per position")
    candidate_seed: int = Field(0, ge=0, description="seed of the candidate draw (the same for every client)")
    min_id: int = Field(1000, ge=0, description="smallest vocabulary id a candidate may have")


def candidate_ids(vocab_size: int, params: DiscretePromptParams) -> torch.Tensor:
    """K sorted distinct ids from ``[min_id, vocab_size)``, drawn with ``candidate_seed``."""
    span = vocab_size - params.min_id
    if span <= 0:
        raise ValueError(f"peft.min_id={params.min_id} leaves no candidate: it must be below the vocabulary size {vocab_size}")
    if params.candidates > span:
        raise ValueError(f"peft.candidates={params.candidates} exceeds the {span} vocabulary ids from peft.min_id="
                         f"{params.min_id} to the vocabulary size {vocab_size}")
    g = torch.Generator().manual_seed(derive_seed(params.candidate_seed, CANDIDATE_TAG))
    return torch.sort(torch.randperm(span, generator=g)[: params.candidates]).values + params.min_id  # (K,)


class DiscretePrompt(torch.nn.Module):
    """The candidates (a buffer) and the distributions (the trainable State). ``override``
    (token ids, (n,)) replaces the argmax prompt for the inference API's calls."""

    def __init__(self, candidates: torch.Tensor, length: int):
        super().__init__()
        self.register_buffer("candidates", candidates)
        k = candidates.numel()
        self.probs = torch.nn.Parameter(torch.full((length, k), 1.0 / k))  # (n, K)
        self.override: torch.Tensor | None = None

    def tokens(self) -> torch.Tensor:
        if self.override is not None:
            return self.override
        return self.candidates[self.probs.detach().argmax(dim=-1)]  # (n,)


def insert_tokens(ids: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None, types: torch.Tensor | None):
    """(B, T) -> (B, 1 + n + T - 1): the prompt after the first token; mask ones, types zeros."""
    b = ids.shape[0]
    p = prompt.to(ids.device, ids.dtype).unsqueeze(0).expand(b, -1)  # (B, n)
    out = {"input_ids": torch.cat([ids[:, :1], p, ids[:, 1:]], dim=1)}
    if mask is not None:
        out["attention_mask"] = torch.cat([mask[:, :1], torch.ones_like(p, dtype=mask.dtype), mask[:, 1:]], dim=1)
    if types is not None:
        out["token_type_ids"] = torch.cat([types[:, :1], torch.zeros_like(p, dtype=types.dtype), types[:, 1:]], dim=1)
    return out


def insert_before_text(ids: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None, positions: bool):
    """(B, T) -> (B, n + T): the prompt right before each row's first real token (mask
    one), with mask ones; ``positions``: position ids counted over the real tokens too."""
    b, t = ids.shape
    n = prompt.numel()
    mask = torch.ones_like(ids) if mask is None else mask
    first = mask.argmax(dim=1, keepdim=True)  # (B, 1): 0 for a right-padded row, its pads for a left-padded one
    j = torch.arange(n + t, device=ids.device).unsqueeze(0)  # (1, n + T)
    rel = j - first  # (B, n + T): the prompt holds rel 0 .. n-1
    in_prompt = (rel >= 0) & (rel < n)
    src = torch.where(j < first, j, j - n).clamp(0, t - 1)  # (B, n + T) source column of a non-prompt position
    p = prompt.to(ids.device, ids.dtype)[rel.clamp(0, n - 1)]  # (B, n + T)
    out = {"input_ids": torch.where(in_prompt, p, ids.gather(1, src)),
           "attention_mask": torch.where(in_prompt, torch.ones_like(rel, dtype=mask.dtype), mask.gather(1, src))}
    if positions:
        out["position_ids"] = (out["attention_mask"].long().cumsum(1) - 1).clamp(min=0)
    return out


# tasks whose model is a causal LM without [CLS]: the prompt goes right before the text
BEFORE_TEXT_TASKS = ("lm_classification",)


def discrete_prompt(model: torch.nn.Module, params: DiscretePromptParams, task: str) -> torch.nn.Module:
    freeze_all(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.discrete_prompt = DiscretePrompt(candidate_ids(vocab, params), params.length)
    original = model.forward
    before_text = task in BEFORE_TEXT_TASKS

    def forward(input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        if input_ids is None:
            raise ValueError("peft.method discrete_prompt: the model needs token ids (input_ids), not embeddings")
        if before_text:
            given = kwargs.pop("position_ids", None) is not None
            inserted = insert_before_text(input_ids, model.discrete_prompt.tokens(), attention_mask, given)
        else:
            inserted = insert_tokens(input_ids, model.discrete_prompt.tokens(), attention_mask, token_type_ids)
        return original(**inserted, **kwargs)

    model.forward = forward
    return model


register_tuner("discrete_prompt", discrete_prompt, DiscretePromptParams)
