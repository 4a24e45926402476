"""Weight masks of a pruned model: which entries of which weights are kept, and PruneFL's
choice of them.

A pruned weight is ``W * m`` with ``m`` a 0/1 mask of the weight's shape; its pruned
entries are exactly zero. Masks travel packed one bit per entry (``pack_mask``: a uint8
tensor of ``ceil(numel / 8)`` bytes), so a mask costs 1/32 of its float32 weight.

``prunable``: the weights a pruning learner may cut: 2-D floating tensors of the shared
State whose names match one of the given ``fnmatch`` patterns, task heads excluded (the
classifier keeps every entry: pruning a label's row would remove the label).

``magnitude_masks``: one-shot magnitude pruning, per weight: the ``ceil(density * numel)``
entries of largest ``|w|`` are kept (ties to the lower index). ``random_masks``: seeded
uniform masks of given per-weight densities. ``prune_and_regrow`` and
``consensus_densities``: FLASH's discovery (``learners/flash.py``, ``aggregators/flash.py``).

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
import math
from typing import Sequence

import torch

from fedfm.codecs.packing import pack_bits, unpack_bits
from fedfm.core.seeding import derive_seed
from fedfm.core.types import State
from fedfm.peft.base import HEAD_MODULES
from fedfm.peft.freezing import is_head
from fedfm.peft.salience import select_top

RANDOM_TAG = 0xF1A5


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


def magnitude_masks(state: State, names: Sequence[str], density: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Per weight, the ``ceil(density * numel)`` entries of largest ``|w|`` (at least one);
    ``density`` is one for all, or one per name."""
    masks = {}
    for n in names:
        w = state[n]
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        d = density[n] if isinstance(density, dict) else density
        keep[select_top(w.detach().float().abs().reshape(-1), d)] = True
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


def zeroing_delta(delta: State, model: State, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> State:
    """``delta`` kept at the entries kept before and after a round, ``-w`` at every other
    entry of a masked weight: after ``model + delta`` the entries ``new`` prunes are exactly
    zero (removed ones, and pruned ones a lossy codec or robust rule made non-zero) and an
    entry ``new`` adds starts at zero."""
    out = dict(delta)
    for n in old:
        out[n] = torch.where(old[n] & new[n], delta[n].to(model[n].dtype), -model[n])
    return out


def masked_view(model: State, masks: dict[str, torch.Tensor]) -> State:
    """``model`` with each masked weight multiplied by its mask."""
    return {n: t * masks[n] if n in masks else t for n, t in model.items()}


def report(prefix: str, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """``<prefix>.density`` (share of prunable entries kept) and ``<prefix>.kept`` (their number)."""
    return {f"{prefix}.density": density(masks), f"{prefix}.kept": sum(int(m.sum()) for m in masks.values())}


def prune_and_regrow(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                     masks: dict[str, torch.Tensor], rate: float) -> int:
    """One dynamic-sparse-training update of ``masks``, in place: in each weight the
    ``int(rate * kept)`` kept entries of smallest ``|w|`` are pruned (ties to the lower
    index), then as many entries are grown back across all weights together, those of
    largest ``|grad|`` among the entries not kept (a just-pruned entry may come back).
    Weights whose entries are pruned are set to zero in place; a grown entry is zero
    until trained. Global regrowth moves density between weights. Returns the count."""
    moved = 0
    for n, m in masks.items():
        r = int(rate * int(m.sum()))
        if r == 0:
            continue
        score = weights[n].detach().abs().float().masked_fill(~m, float("inf")).reshape(-1)  # (numel,)
        drop = torch.sort(score, stable=True).indices[:r]
        m.view(-1)[drop] = False
        moved += r
    if moved:
        names = list(masks)
        flat = torch.cat([grads[n].detach().abs().float().masked_fill(masks[n], -1.0).reshape(-1) for n in names])
        grow = torch.sort(flat, descending=True, stable=True).indices[:moved]
        keep = torch.cat([masks[n].reshape(-1) for n in names])
        keep[grow] = True
        start = 0
        for n in names:
            size = masks[n].numel()
            masks[n].copy_(keep[start:start + size].view(masks[n].shape))
            start += size
    with torch.no_grad():
        for n, m in masks.items():
            weights[n].mul_(m)
    return moved


def consensus_densities(client_masks: list[dict[str, torch.Tensor]], target: float) -> dict[str, float]:
    """FLASH's layer densities: each weight's share of kept entries averaged over the
    clients' masks, all scaled by one factor so that the whole reaches ``target`` density,
    each capped at 1 (so the whole may fall short of ``target`` when caps bind)."""
    names = list(client_masks[0])
    mean = {n: sum(float(cm[n].float().mean()) for cm in client_masks) / len(client_masks) for n in names}
    total = sum(client_masks[0][n].numel() for n in names)
    kept = sum(mean[n] * client_masks[0][n].numel() for n in names)
    ratio = target * total / kept if kept > 0 else 0.0
    return {n: min(mean[n] * ratio, 1.0) for n in names}


def random_masks(shapes: dict[str, torch.Tensor], densities: dict[str, float], seed: int) -> dict[str, torch.Tensor]:
    """Per weight, ``ceil(density * numel)`` entries drawn uniformly without replacement
    (at least one) from a generator seeded by ``derive_seed(seed, position)``."""
    masks = {}
    for i, (n, like) in enumerate(shapes.items()):
        k = max(1, math.ceil(densities[n] * like.numel()))
        g = torch.Generator().manual_seed(derive_seed(seed, RANDOM_TAG, i))
        keep = torch.zeros(like.numel(), dtype=torch.bool)
        keep[torch.randperm(like.numel(), generator=g)[:k]] = True
        masks[n] = keep.view(like.shape)
    return masks
