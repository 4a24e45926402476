"""FedKSeed-Pro's non-uniform seed sampling by score (Qin et al. 2024, "Federated
Full-Parameter Tuning of Billion-Sized Language Models with Communication Cost under 18
Kilobytes", Section 4.3, "Non-uniform seed sampling").

A seed whose directions gave large projected gradients so far is a more useful direction;
FedKSeed-Pro samples it more often. The importance of seed k is the mean amplitude of its
history of projected-gradient scalars,

    psi_k = mean(min(|g|, clip) for g in H_k),   H_k = {0} + every scalar sent for seed k,

(the history starts with one entry 0 and the amplitudes are clipped at ``score_clip``,
as in the authors' released code), min-max normalised and turned into probabilities by a
softmax:

    p = softmax((psi - min psi) / (max psi - min psi + 1e-10)).

The normalised scores lie in [0, 1], so the likeliest seed is at most e times as likely
as the least likely one; with no history every psi is 0 and p is uniform.

Who draws: the server, which holds the history. Sending the probabilities to every
client instead would cost K floats a client-round (16 KB at K = 4096, most of the 18 KB
budget); the server draws from the same distribution and sends only the indices. It keeps ``amp`` (K,) float64, the sum of
the clipped amplitudes, and ``count`` (K,) float64, 1 + the number of scalars, per seed in
the server-state group ``fedkseed.history`` (checkpointed), and draws each participant's
``steps`` seed indices (with replacement, ``torch.multinomial``, seeded by the run's
``seed``, ``pool_seed``, round and client) when it sends the history rows (``fedkseed_history``
phase, tensor ``draw`` int32 (steps,), 4 B a step down). So a client needs no per-seed
statistics, and a fresh client gets the same draw as a cached one. The client runs its
MeZO steps along the drawn seeds and sends the pairs as in uniform FedKSeed.

Written by hand: a few lines of arithmetic on the history that no library holds.
"""

from __future__ import annotations

import torch

from fedfm.core.seeding import derive_seed

DRAW_TAG = 0x9E0


def init_scores(num_seeds: int) -> dict[str, torch.Tensor]:
    """Every seed's history is {0}: amplitude sum 0, one entry."""
    return {"amp": torch.zeros(num_seeds, dtype=torch.float64), "count": torch.ones(num_seeds, dtype=torch.float64)}


def add_scores(scores: dict[str, torch.Tensor], seeds: torch.Tensor, grads: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    """The statistics with one client's (seed, scalar) pairs appended (new tensors)."""
    seeds = seeds.to(torch.int64).reshape(-1)
    amp = grads.to(torch.float64).reshape(-1).abs().clamp(max=clip)
    return {
        "amp": scores["amp"].clone().index_add_(0, seeds, amp),
        "count": scores["count"].clone().index_add_(0, seeds, torch.ones_like(amp)),
    }


def seed_probabilities(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """p = softmax(min-max normalised mean amplitude), float64 (K,)."""
    psi = scores["amp"] / scores["count"]
    norm = (psi - psi.min()) / (psi.max() - psi.min() + 1e-10)
    return torch.softmax(norm, 0)


def draw_seeds(probs: torch.Tensor, steps: int, run_seed: int, pool_seed: int, rnd: int, cid: int) -> torch.Tensor:
    """``steps`` seed indices for client ``cid`` in round ``rnd``, drawn from ``probs`` with
    replacement, seeded by (run seed, pool seed, round, client): runs with another ``seed``
    draw other seeds, as uniform FedKSeed's clients do; the same after a resume. int64 (steps,)."""
    g = torch.Generator().manual_seed(derive_seed(run_seed, DRAW_TAG, pool_seed, rnd, cid))
    return torch.multinomial(probs, steps, replacement=True, generator=g)
