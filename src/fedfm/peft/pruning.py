"""Weight masks of a pruned model: which entries of which weights are kept, and PruneFL's
choice of them.

A pruned weight is ``W * m`` with ``m`` a 0/1 mask of the weight's shape; its pruned
entries are exactly zero. Masks travel packed one bit per entry (``pack_mask``: a uint8
tensor of ``ceil(numel / 8)`` bytes), so a mask costs 1/32 of its float32 weight.

``prunable``: the weights a pruning learner may cut: 2-D floating tensors of the shared
State whose names match one of the given ``fnmatch`` patterns, task heads excluded (the
classifier keeps every entry: pruning a label's row would remove the label).

``magnitude_masks``: one-shot magnitude pruning, per weight: the ``ceil(density * numel)``
entries of largest ``|w|`` are kept (ties to the lower index).

``select_kept``: PruneFL's adaptive choice (Jiang et al. 2023, "Model Pruning Enables
Efficient Federated Learning on Edge Devices", IEEE TNNLS): keep the set ``M`` of entries
that maximises the approximate empirical-risk reduction of one round divided by the
round's time, ``sum_{j in M} g_j^2 / (c + sum_{j in M} t_j)``, where ``g_j^2`` is entry
j's squared gradient and ``T(M) = c + sum t_j`` the round time, linear in the entries kept.
The optimum is a prefix of the entries sorted by ``g_j^2 / t_j`` (the paper's result);
with one time ``t`` per entry, as here (every prunable entry is a linear layer's weight,
whose cost in a round is its value on the wire and its share of a dense matmul), the
order is that of ``g_j^2`` and the prefix length ``k`` maximises
``S_k / (c + t k)``, ``S_k`` the sum of the ``k`` largest. Entries are ranked across all
prunable weights together (a weight may lose every entry); equal values go to the lower
position in State order. Written by hand: no library implements PruneFL's rule.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch

from fedfm.codecs.packing import pack_bits, unpack_bits
from fedfm.core.types import State
from fedfm.peft.base import HEAD_MODULES
from fedfm.peft.freezing import is_head
from fedfm.peft.salience import select_top


def prunable(state: State, patterns: Sequence[str]) -> list[str]:
    """Names (State order) of the 2-D floating weights matching ``patterns``, heads excluded."""
    return [
        n for n, t in state.items()
        if t.dim() == 2 and t.is_floating_point() and not is_head(n, list(HEAD_MODULES))
        and any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(…) bool -> (ceil(numel/8),) uint8, one bit per entry."""
    return pack_bits(mask.reshape(-1).to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask of ``like``'s shape packed in ``packed``."""
    return unpack_bits(packed, 1, like.numel()).to(torch.bool).view(like.shape)


def packed_like(state: State, names: Sequence[str]) -> State:
    """The shapes of the packed masks of ``names`` (zeros), for a decoder's reference."""
    return {n: torch.zeros((state[n].numel() + 7) // 8, dtype=torch.uint8) for n in names}


def magnitude_masks(state: State, names: Sequence[str], density: float) -> dict[str, torch.Tensor]:
    """Per weight, the ``ceil(density * numel)`` entries of largest ``|w|``."""
    masks = {}
    for n in names:
        w = state[n]
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[select_top(w.detach().float().abs().reshape(-1), density)] = True
        masks[n] = keep.view(w.shape)
    return masks


def prefix_length(sorted_scores: torch.Tensor, fixed_s: float, per_value_s: float) -> int:
    """``k`` (>= 1) maximising ``S_k / (fixed_s + per_value_s * k)`` over the descending
    ``sorted_scores``; the smallest such ``k`` on ties."""
    sums = torch.cumsum(sorted_scores.double(), dim=0)  # (n,)
    counts = torch.arange(1, sorted_scores.numel() + 1, dtype=torch.float64)  # (n,)
    ratio = sums / (fixed_s + per_value_s * counts)  # (n,)
    return int(torch.argmax(ratio)) + 1  # argmax returns the first maximum


def select_kept(scores: dict[str, torch.Tensor], fixed_s: float, per_value_s: float) -> dict[str, torch.Tensor]:
    """PruneFL's mask from per-entry squared gradients ``scores`` (name -> weight-shaped)."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().double().reshape(-1).clamp_min(0) for n in names])  # (N,)
    order = torch.sort(flat, descending=True, stable=True).indices  # (N,)
    k = prefix_length(flat[order], fixed_s, per_value_s)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    masks, start = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = keep[start:start + size].view(scores[n].shape)
        start += size
    return masks


def density(masks: dict[str, torch.Tensor]) -> float:
    """The share of entries kept over all masks."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)
