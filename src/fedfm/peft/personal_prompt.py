"""A soft prompt beside any shared tuner: personal prompts for personalization.

Client-specific soft prompts guide a shared model toward each client's data (survey
section 4.2, "prompt-based methods involve using client-specific soft prompts"; the prompt
itself is prompt tuning, Lester et al. 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning"; personal prompts next to shared parameters as in pFedPrompt, Guo et al.
2023, "pFedPrompt: Learning Personalized Prompt for Vision-Language Models in Federated
Learning", of which only the "a prompt per client beside shared parameters" idea is
implemented here: no prompt generator and no attention module).

``peft: {method: personal_prompt, num_virtual_tokens: 8, shared: {method: lora, r: 8, ...}}``
applies the ``shared`` tuner (any registered one but the prompt-based ones), then adds a
trainable prompt ``personal_prompt.embedding`` (P, H) inserted after the first token
(``[CLS]`` of an encoder, whose pooled state the classifier reads) of every input, with the
attention mask extended to cover it. ``peft.local: ["personal_prompt.*"]`` keeps the prompt
on each client while the shared tuner travels. The prompt starts as P rows of the word
embedding table drawn with the seeded generator (peft's ``sample_vocab`` init).

Written by hand because ``peft`` cannot combine a prompt-learning config with a LoRA (or
other) adapter in one model.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedfm.peft.base import register_tuner, tuners

PROMPT_TUNERS = ("prompt_tuning", "prefix_tuning", "p_tuning", "personal_prompt")


class SharedTunerSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    method: str = Field("lora", description="the shared tuner's peft.method")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PersonalPromptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(8, ge=1, description="P, the number of prompt vectors")
    shared: SharedTunerSpec = Field(default_factory=SharedTunerSpec, description="the shared tuner and its parameters")

    @model_validator(mode="after")
    def _shared(self):
        if self.shared.method in PROMPT_TUNERS:
            raise ValueError(f"shared.method '{self.shared.method}' is prompt-based; give a non-prompt tuner (lora, adapter, ...)")
        tuners.parse(self.shared.method, self.shared.params(), "peft.shared")
        return self


class PromptHolder(torch.nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embedding = torch.nn.Parameter(init)  # (P, H)


def insert_prompt(embeds: torch.Tensor, mask: torch.Tensor | None, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, H) embeddings -> (B, 1 + P + T - 1, H), the prompt after the first token; the mask likewise.
    ``prompt``: (P, H), the same for every input, or (B, P, H), one per input."""
    b = embeds.shape[0]
    p = prompt.to(embeds.dtype)
    p = p if p.dim() == 3 else p.unsqueeze(0).expand(b, -1, -1)  # (B, P, H)
    out = torch.cat([embeds[:, :1], p, embeds[:, 1:]], dim=1)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    ones = torch.ones((b, p.shape[1]), dtype=mask.dtype, device=mask.device)
    return out, torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)


def personal_prompt(model: torch.nn.Module, params: PersonalPromptParams, task: str) -> torch.nn.Module:
    inner = params.shared.method
    inner_params = tuners.parse(inner, params.shared.params(), "peft.shared")
    model = tuners.get(inner).obj(model, inner_params, task)
    table = model.get_input_embeddings().weight  # (V, H)
    rows = torch.randint(0, table.shape[0], (params.num_virtual_tokens,))
    model.personal_prompt = PromptHolder(table[rows].detach().clone().float())
    original = model.forward

    def forward(input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)  # (B, T, H)
        embeds, mask = insert_prompt(inputs_embeds, attention_mask, model.personal_prompt.embedding)
        return original(input_ids=None, attention_mask=mask, inputs_embeds=embeds, **kwargs)

    model.forward = forward
    return model


register_tuner("personal_prompt", personal_prompt, PersonalPromptParams)
