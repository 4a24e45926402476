"""Heterogeneous LoRA ranks and layers: pure functions over a LoRA State.

Shared by HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models"), FlexLoRA (Bai et al. 2024, "Federated Fine-tuning of Large
Language Models under Heterogeneous Tasks and Client Resources") and FedRA (Su et al.
2023, "FedRA: A Random Allocation Strategy for Federated Tuning to Unleash the Power of
Heterogeneous Clients").

The one base model carries LoRA at the largest rank ``r_max`` (``peft.r``). A client of
rank ``r`` holds the first ``r`` components: ``A[:r, :]`` (peft's ``lora_A``, shape
``(r, in)``) and ``B[:, :r]`` (``lora_B``, shape ``(out, r)``), so ``B[:, :r] A[:r, :]`` is
the sum of its first ``r`` rank-one terms. Every rank shares peft's one scaling
``alpha / r_max``, so truncating and zero-padding commute with the product and a rank-``r``
view of the ``r_max`` model computes exactly what the client's rank-``r`` LoRA computes.

Written by hand: ``peft`` has no operation that slices or pads a LoRA State by rank, nor a
notion of a transformer layer index in a State name.
"""

from __future__ import annotations

import re

import torch

from fedfm.core.types import State

LORA_A = ".lora_A."
LORA_B = ".lora_B."
LAYER = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def is_lora_a(name: str) -> bool:
    return LORA_A in name


def is_lora_b(name: str) -> bool:
    return LORA_B in name


def module_of(name: str) -> str:
    """The LoRA module a factor belongs to: the name with ``.lora_A.``/``.lora_B.`` cut out."""
    return name.replace(LORA_A, ".lora.").replace(LORA_B, ".lora.")


def lora_rank(state: State) -> int:
    """The rank of a LoRA State (every A factor must agree); 0 without LoRA factors."""
    ranks = {int(t.shape[0]) for n, t in state.items() if is_lora_a(n)}
    if len(ranks) > 1:
        raise ValueError(f"LoRA factors of different ranks {sorted(ranks)} in one State")
    return ranks.pop() if ranks else 0


def truncate(state: State, rank: int) -> State:
    """The rank-``rank`` view: ``A[:rank, :]``, ``B[:, :rank]``; other tensors unchanged."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    out: State = {}
    for n, t in state.items():
        if is_lora_a(n):
            if rank > t.shape[0]:
                raise ValueError(f"cannot truncate '{n}' of rank {t.shape[0]} to rank {rank}")
            out[n] = t[:rank, :].clone()  # (rank, in)
        elif is_lora_b(n):
            if rank > t.shape[1]:
                raise ValueError(f"cannot truncate '{n}' of rank {t.shape[1]} to rank {rank}")
            out[n] = t[:, :rank].clone()  # (out, rank)
        else:
            out[n] = t
    return out


def pad(state: State, rank: int) -> State:
    """Zero-pad every LoRA factor to ``rank``: ``A`` gains zero rows, ``B`` zero columns."""
    out: State = {}
    for n, t in state.items():
        if is_lora_a(n):
            if t.shape[0] > rank:
                raise ValueError(f"'{n}' has rank {t.shape[0]} > {rank}: truncate, not pad")
            out[n] = torch.cat([t, t.new_zeros(rank - t.shape[0], t.shape[1])], 0)  # (rank, in)
        elif is_lora_b(n):
            if t.shape[1] > rank:
                raise ValueError(f"'{n}' has rank {t.shape[1]} > {rank}: truncate, not pad")
            out[n] = torch.cat([t, t.new_zeros(t.shape[0], rank - t.shape[1])], 1)  # (out, rank)
        else:
            out[n] = t
    return out


def lora_pairs(state: State) -> dict[str, tuple[str, str]]:
    """module -> (A name, B name), for every LoRA module of ``state``."""
    a = {module_of(n): n for n in state if is_lora_a(n)}
    b = {module_of(n): n for n in state if is_lora_b(n)}
    if set(a) != set(b):
        raise ValueError(f"LoRA factors without their pair: {sorted(set(a) ^ set(b))[:3]}")
    return {m: (a[m], b[m]) for m in sorted(a)}


def products(state: State) -> State:
    """module -> ``B @ A`` (``(out, in)``, float64): each module's low-rank update."""
    return {m: state[b].double() @ state[an].double() for m, (an, b) in lora_pairs(state).items()}


def svd_factors(dw: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with ``B = U_r S_r`` (``(out, r)``) and ``A = V_r^T`` (``(r, in)``): the best
    rank-``r`` approximation of ``dw`` (Eckart-Young); exact when ``r >= rank(dw)``. With
    ``r`` above ``min(out, in)`` the extra components are zero."""
    u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)  # (out, k), (k,), (k, in)
    k = min(rank, s.numel())
    b = u[:, :k] * s[:k]  # (out, k)
    a = vh[:k, :]  # (k, in)
    if k < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], 0)
    return b, a


def layer_of(name: str) -> int | None:
    """The transformer layer index in a State name (``...encoder.layer.3.attention...``)."""
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def num_layers(state: State) -> int:
    """1 + the largest layer index among the names of ``state`` (0 without layers)."""
    idx = [i for i in (layer_of(n) for n in state) if i is not None]
    return max(idx) + 1 if idx else 0


def layer_subset(state: State, layers: set[int] | list[int]) -> State:
    """The entries of ``state`` in ``layers``, plus every entry outside all layers (the head)."""
    keep = set(layers)
    return {n: t for n, t in state.items() if layer_of(n) is None or layer_of(n) in keep}


def rank_grad_mask(model: torch.nn.Module, rank: int) -> list:
    """Zero the gradients of every LoRA component at index >= ``rank`` (hooks; returns the
    handles to remove). With zero gradients and zero values the components stay zero under
    SGD and AdamW alike, so the model trains exactly its rank-``rank`` view."""
    handles = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_lora_a(n) and p.shape[0] > rank:
            mask = torch.zeros_like(p)
            mask[:rank, :] = 1
            handles.append(p.register_hook(lambda g, m=mask: g * m))
        elif is_lora_b(n) and p.shape[1] > rank:
            mask = torch.zeros_like(p)
            mask[:, :rank] = 1
            handles.append(p.register_hook(lambda g, m=mask: g * m))
    return handles
