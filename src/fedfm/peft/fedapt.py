"""FedAPT's adaptive prompt for a text classifier (Su et al. 2024, "Federated Adaptive
Prompt Tuning for Multi-Domain Collaborative Learning", AAAI; code:
github.com/leondada/FedAPT).

The module of the paper, with its three parts, carried from CLIP's text prompts to a
soft prompt inserted after ``[CLS]`` of an encoder classifier:

- a *meta prompt* ``fedapt.prompt`` (P, H), trainable and shared;
- K frozen random *keys* (K, P, H), uniform in [0, 1) as in the paper's code, one per
  domain; drawn once from the seeded global generator, identical in every process (the
  paper's server draws them and sends them; here both ends draw the same), never in the
  State. Domain ``d``'s prompt is ``prompt + prompt * key_d`` (element-wise);
- an *adaptive network* ``fedapt.query``: a bias-free linear map (H -> K) of the input's
  frozen feature ``f(x)`` (here: the frozen encoder's mean-pooled last hidden state of the
  input *without* the prompt, computed without gradient, in eval mode; CLIP's frozen image
  feature in the paper), trained with cross-entropy to name the client's domain.

Training (``fedapt`` learner, ``personalize/fedapt.py``) sets the client's domain ``d``:
the prompt is ``prompt + prompt * key_d`` and the loss adds ``CE(query(f(x)), d)``.
Evaluation (no domain set: the global model) selects per input: ``z = query(f(x))``,
standardised over the K entries (mean 0, unbiased variance 1, as the paper's code),
``w = softmax(z / temperature)`` (``temperature`` 0.01 in the paper: nearly one-hot) and
the prompt ``prompt + prompt * sum_i w_i key_i``. With K = 1 the weight is 1.

The classifier head is trained and shared beside the prompt (CLIP needs no head; a text
encoder classifier does). Written by hand: no library implements FedAPT, and peft's prompt
tuning has no per-input prompt.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.peft.base import register_tuner
from fedfm.peft.freezing import freeze_all, train_heads
from fedfm.peft.personal_prompt import insert_prompt


class FedAPTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(8, ge=1, description="P, the length of the meta prompt")
    num_domains: int = Field(2, ge=1, description="K, the number of keys (one per client domain)")
    temperature: float = Field(0.01, gt=0, description="softmax temperature of the key weights at evaluation")


def key_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, K) adaptive-network outputs -> (B, K) key weights: standardise each row (mean 0,
    unbiased std 1), then softmax(z / temperature). One key: weight 1."""
    if scores.shape[-1] == 1:
        return torch.ones_like(scores)
    z = (scores - scores.mean(dim=-1, keepdim=True)) / scores.var(dim=-1, keepdim=True).sqrt()
    return torch.softmax(z / temperature, dim=-1)


def keyed_prompt(prompt: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(P, H) meta prompt, (K, P, H) keys, (B, K) weights -> (B, P, H) prompts
    ``prompt + prompt * sum_i w_i key_i``."""
    mixed = torch.einsum("bk,kph->bph", weights.to(keys.dtype), keys)  # (B, P, H)
    return prompt.unsqueeze(0) + prompt.unsqueeze(0) * mixed


class FedAPTModule(torch.nn.Module):
    def __init__(self, prompt: torch.Tensor, keys: torch.Tensor, temperature: float):
        super().__init__()
        self.prompt = torch.nn.Parameter(prompt)  # (P, H)
        self.query = torch.nn.Linear(prompt.shape[1], keys.shape[0], bias=False)
        self.register_buffer("keys", keys, persistent=False)  # (K, P, H)
        self.temperature = temperature
        self.domain: int | None = None  # set by the fedapt learner while a client trains
        self.last_scores: torch.Tensor | None = None  # (B, K), the adaptive network's last outputs

    def prompts(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, H) frozen features -> (B, P, H) prompts (the client's key, or the adaptive mix)."""
        scores = self.query(feature.to(self.query.weight.dtype))  # (B, K)
        self.last_scores = scores
        if self.domain is not None:
            weights = torch.nn.functional.one_hot(torch.full((feature.shape[0],), self.domain), self.keys.shape[0])
        else:
            weights = key_weights(scores, self.temperature)
        return keyed_prompt(self.prompt, self.keys, weights.to(scores.device))


def frozen_feature(encoder: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean-pooled last hidden state of the frozen encoder, no gradient, eval mode: (B, H)."""
    was = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            h = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    finally:
        encoder.train(was)
    m = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.dtype)
    return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)  # (B, H)


def fedapt(model: torch.nn.Module, params: FedAPTParams, task: str) -> torch.nn.Module:
    if task != "text_classification":
        raise ValueError(f"peft.method fedapt: model.task '{task}' is not supported (text_classification only)")
    freeze_all(model)
    train_heads(model)
    table = model.get_input_embeddings().weight  # (V, H)
    rows = torch.randint(0, table.shape[0], (params.num_virtual_tokens,))
    keys = torch.rand(params.num_domains, params.num_virtual_tokens, table.shape[1])  # (K, P, H)
    model.fedapt = FedAPTModule(table[rows].detach().clone().float(), keys, params.temperature)
    encoder = model.base_model
    original = model.forward

    def forward(input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if input_ids is None:
            raise ValueError("peft.method fedapt needs input_ids (the adaptive network reads the frozen encoder's feature)")
        feature = frozen_feature(encoder, input_ids, attention_mask)  # (B, H)
        prompts = model.fedapt.prompts(feature)  # (B, P, H)
        embeds = model.get_input_embeddings()(input_ids)  # (B, T, H)
        embeds, mask = insert_prompt(embeds, attention_mask, prompts)  # (B, 1 + P + T - 1, H)
        return original(input_ids=None, attention_mask=mask, inputs_embeds=embeds, **kwargs)

    model.forward = forward
    return model


register_tuner("fedapt", fedapt, FedAPTParams)
