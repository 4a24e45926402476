"""LoRA's product space: distances between what two LoRA updates do to the weights.

A LoRA module trains ``A`` (r, in) and ``B`` (out, r) and adds ``scale * B @ A`` to the
frozen weight (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models").
A rule that treats ``A`` and ``B`` as separate coordinates (every rule here by default,
``space: coordinates``) compares parameter deltas, but the same change of the weight can
come from very different (dA, dB), and a small dA can be a large weight change when B is
large. ``space: lora_product`` instead compares each client's *effective* weight change

    dW_k = (B + dB_k) @ (A + dA_k) - B @ A          # (out, in), per LoRA module

(at the server's current A, B), concatenated over modules, with every tensor that is not
part of a LoRA pair (the classification head) kept as is. The ``alpha / r`` factor is left
out: it is the same for every client, so it changes no choice of Krum or of the clustering
(it only reweights LoRA modules against the head). Rules still combine the clients' sent
(A, B) deltas: the product only decides who is trusted.

Pairs are found by the names ``peft`` gives them: ``<module>.lora_A.<adapter>.weight`` and
``<module>.lora_B.<adapter>.weight``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.core.types import State

A_TAG, B_TAG = ".lora_A.", ".lora_B."


def lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(A name, B name) for every LoRA module whose both halves are in ``names``."""
    have = set(names)
    pairs = []
    for a in names:
        if A_TAG in a:
            b = a.replace(A_TAG, B_TAG)
            if b in have:
                pairs.append((a, b))
    return pairs


def product_rows(state: State, deltas: Sequence[State]) -> torch.Tensor:
    """(n, d') float64: each client's effective weight changes plus its other deltas."""
    names = [k for k, t in state.items() if t.is_floating_point()]
    pairs = lora_pairs(names)
    if not pairs:
        raise ValueError("aggregator.space=lora_product: the shared State has no LoRA A/B pairs (peft.method is not lora?)")
    in_pairs = {n for p in pairs for n in p}
    rest = [k for k in names if k not in in_pairs]
    rows = []
    for d in deltas:
        parts = []
        for a, b in pairs:
            A, B = state[a].to(torch.float64), state[b].to(torch.float64)  # (r, in), (out, r)
            dA, dB = d[a].to(torch.float64), d[b].to(torch.float64)
            parts.append(((B + dB) @ (A + dA) - B @ A).reshape(-1))  # (out * in,)
        parts += [d[k].to(torch.float64).reshape(-1) for k in rest]
        rows.append(torch.cat(parts))
    return torch.stack(rows)
