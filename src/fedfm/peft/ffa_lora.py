"""FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning"):
LoRA with the down projection A frozen at its random initialisation; only B is trained
and shared, which halves LoRA's traffic and makes FedAvg of the products exact
(mean(B_i) A = mean(B_i A) when every client has the same A).

Built on peft's LoRA. A must be identical on every client: it is drawn from the torch
generator the runtime seeds from the experiment seed before the tuner is applied, or,
with ``a_seed``, from a generator of its own. Being frozen, A is part of the base model
(covered by the base fingerprint that clients compare), never of the State.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from fedfm.peft.base import register_tuner
from fedfm.peft.freezing import matches
from fedfm.peft.lora import LoraParams, lora


class FfaLoraParams(LoraParams):
    a_seed: int | None = Field(None, description="seed of A's init (default: the runtime's seeded RNG)")


def lora_a_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n]


def check_no_embeddings(model: torch.nn.Module, targets: list[str]) -> None:
    """peft's LoRA on an embedding table starts A at zero and B random (names
    ``lora_embedding_A/B``), the reverse of a linear layer's: a frozen random A does not
    exist there, and both factors would train."""
    for name, module in model.named_modules():
        hit = [t for t in targets if matches(name, t)]
        if hit and isinstance(module, torch.nn.Embedding):
            raise ValueError(f"peft.target_modules: '{hit[0]}' matches the embedding '{name}': ffa_lora freezes A at "
                             "a random init, which peft's embedding LoRA does not have (its A starts at zero); "
                             "target linear layers, or use method lora")


def ffa_lora(model: torch.nn.Module, params: FfaLoraParams, task: str) -> torch.nn.Module:
    check_no_embeddings(model, list(params.target_modules))
    model = lora(model, params, task)
    gen = torch.Generator().manual_seed(params.a_seed) if params.a_seed is not None else None
    for _, p in lora_a_weights(model):
        if gen is not None:
            # peft's own init of A: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(p.shape[1])
            with torch.no_grad():
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)  # (r, in)
        p.requires_grad_(False)
    return model


register_tuner("ffa_lora", ffa_lora, FfaLoraParams)
