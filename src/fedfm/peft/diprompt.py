"""DiPrompT-inspired disentangled prompts for a text classifier (Bai, Zhang, Li, Guo, Guo,
Hou, Han and Lu 2024, "DiPrompT: Disentangled Prompt Tuning for Multiple Latent Domain
Generalization in Federated Learning", CVPR).

The paper's two kinds of prompts, carried from CLIP's text prompts to soft prompts
inserted after ``[CLS]`` of an encoder classifier (as ``peft/fedapt.py`` does for FedAPT),
with the classifier head trained and shared beside them:

- a *global prompt* ``diprompt.global_prompt`` (P, H): domain-invariant knowledge, trained
  by every client and averaged by the server;
- M *domain prompts* ``diprompt.domains.<m>`` (P, H each, separate parameters so that a
  prompt no input of a client used gets no gradient and an exact-zero delta): one per
  *latent* domain; M need not equal the number of clients, and no client is told its
  domain.

Each prompt gives its own prediction: the encoder is run with that prompt alone after
``[CLS]`` (all prompts of a batch in one forward pass, the inputs repeated).

*Dynamic query* (here; the paper's two-substep CLIP image-text alignment with a learned
Q-Prompt has no text-only counterpart): an input's score for domain prompt m is the
confidence of m's prediction, ``max_y softmax(f(x; D_m))_y`` (``query: confidence``,
label-free, the same query at training and inference), or, while training,
``-CE(f(x; D_m), y)`` (``query: loss``, the lowest loss; inference then falls back to the
confidence). The input is assigned to the highest score (``assign_domains``).

*Collaborative ensemble* at inference (the global model, no domain known):
``p(y|x) = g p_G(y|x) + (1 - g) sum_m w_m(x) p_m(y|x)``, ``w(x) = softmax(c(x) / T)`` over
the domain prompts' confidences ``c_m(x)``, ``g`` = ``global_weight``; the forward pass
returns ``log p`` as the logits (argmax and cross-entropy then read the ensemble).

Training (``diprompt`` learner, ``personalize/diprompt.py``) minimises
``CE(f(x; G), y) + CE(f(x; D_{a(x)}), y)`` with ``a(x)`` the queried domain. Written by
hand: no library implements DiPrompT, and peft's prompt tuning has no per-input prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from transformers.modeling_outputs import SequenceClassifierOutput

from fedfm.peft.base import register_tuner
from fedfm.peft.freezing import freeze_all, train_heads
from fedfm.peft.personal_prompt import insert_prompt


class DiPromptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(8, ge=1, description="P, the length of each prompt")
    num_domains: int = Field(2, ge=1, description="M, the number of domain prompts (latent domains; need not equal the clients)")
    global_weight: float = Field(0.5, ge=0, le=1, description="g, the global prompt's share of the ensemble")
    temperature: float = Field(0.1, gt=0, description="T, softmax temperature over the domain prompts' confidences")


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """(..., C) logits -> (...) the highest class probability."""
    return torch.softmax(logits.float(), dim=-1).max(dim=-1).values


def query_scores(domain_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(M, B, C) logits of the M domain prompts -> (B, M) scores: the confidence, or, given
    (B,) labels, minus the cross-entropy (the lowest loss scores highest)."""
    if labels is None:
        return confidence(domain_logits).T
    m = domain_logits.shape[0]
    ce = F.cross_entropy(domain_logits.float().flatten(0, 1), labels.repeat(m), reduction="none")  # (M * B,)
    return -ce.view(m, -1).T


def assign_domains(scores: torch.Tensor) -> torch.Tensor:
    """(B, M) scores -> (B,) the highest-scoring domain prompt (the lowest index on ties)."""
    return torch.argmax(scores, dim=-1)


def ensemble_weights(domain_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(M, B, C) -> (B, M) weights ``softmax(confidence / T)`` of the domain prompts."""
    return torch.softmax(confidence(domain_logits).T / temperature, dim=-1)


def ensemble(global_logits: torch.Tensor, domain_logits: torch.Tensor, global_weight: float, temperature: float) -> torch.Tensor:
    """(B, C) global and (M, B, C) domain logits -> (B, C) ``log p`` of the collaborative ensemble."""
    w = ensemble_weights(domain_logits, temperature)  # (B, M)
    p_dom = torch.einsum("bm,mbc->bc", w, torch.softmax(domain_logits.float(), dim=-1))
    p = global_weight * torch.softmax(global_logits.float(), dim=-1) + (1 - global_weight) * p_dom
    return torch.log(p.clamp_min(1e-30))


class DiPromptModule(torch.nn.Module):
    def __init__(self, global_prompt: torch.Tensor, domain_prompts: list[torch.Tensor], global_weight: float, temperature: float):
        super().__init__()
        self.global_prompt = torch.nn.Parameter(global_prompt)  # (P, H)
        self.domains = torch.nn.ParameterList([torch.nn.Parameter(d) for d in domain_prompts])  # M x (P, H)
        self.global_weight, self.temperature = global_weight, temperature
        self.run = None  # (input_ids, mask, prompts (N, P, H)) -> (N, C) logits; set by the tuner

    def domain_stack(self) -> torch.Tensor:
        return torch.stack(list(self.domains))  # (M, P, H)

    def each_prompt(self, input_ids: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor) -> torch.Tensor:
        """Every input under every one of K prompts (K, P, H), in one pass -> (K, B, C)."""
        k, b = prompts.shape[0], input_ids.shape[0]
        rows = prompts.repeat_interleave(b, dim=0)  # (K * B, P, H)
        m = None if mask is None else mask.repeat(k, 1)
        return self.run(input_ids.repeat(k, 1), m, rows).view(k, b, -1)


def diprompt(model: torch.nn.Module, params: DiPromptParams, task: str) -> torch.nn.Module:
    if task != "text_classification":
        raise ValueError(f"peft.method diprompt: model.task '{task}' is not supported (text_classification only)")
    freeze_all(model)
    train_heads(model)
    table = model.get_input_embeddings().weight  # (V, H)
    rows = torch.randint(0, table.shape[0], (params.num_domains + 1, params.num_virtual_tokens))
    init = [table[r].detach().clone().float() for r in rows]  # peft's sample_vocab init, a draw per prompt
    model.diprompt = DiPromptModule(init[0], init[1:], params.global_weight, params.temperature)
    original = model.forward

    def run(input_ids, attention_mask, prompts):
        embeds = model.get_input_embeddings()(input_ids)  # (N, T, H)
        embeds, mask = insert_prompt(embeds, attention_mask, prompts)  # (N, 1 + P + T - 1, H)
        return original(input_ids=None, attention_mask=mask, inputs_embeds=embeds).logits

    model.diprompt.run = run

    def forward(input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if input_ids is None:
            raise ValueError("peft.method diprompt needs input_ids (each prompt is inserted after [CLS])")
        module = model.diprompt
        prompts = torch.cat([module.global_prompt.unsqueeze(0), module.domain_stack()])  # (1 + M, P, H)
        logits = module.each_prompt(input_ids, attention_mask, prompts)  # (1 + M, B, C)
        return SequenceClassifierOutput(logits=ensemble(logits[0], logits[1:], module.global_weight, module.temperature))

    model.forward = forward
    return model


register_tuner("diprompt", diprompt, DiPromptParams)
