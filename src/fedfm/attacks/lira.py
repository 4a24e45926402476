"""Calibrated membership inference: LiRA (Carlini et al. 2022, "Membership Inference
Attacks From First Principles", Algorithm 1), offline and online.

The attacker trains reference models WITHOUT the target examples ("OUT" models: the same
federated recipe run on population data that excludes every candidate), and for each
candidate (x, y) fits a Gaussian N(mu_out, sigma_out^2) to the reference models'
logit-scaled confidence phi = log(p_y / (1 - p_y)) on it. The target model's confidence
phi_obs is then scored by the one-sided likelihood test of the offline variant:

    score = P[Z < phi_obs] = Phi((phi_obs - mu_out) / sigma_out),   Z ~ N(mu_out, sigma_out^2)

(the probability that an OUT model would be less confident than the target model; high
means member). phi is computed stably as z_y - logsumexp_{j != y} z_j from the logits z,
which equals log(p_y / (1 - p_y)). With few reference models the per-example variance is
noisy, and the paper uses one global variance then ("fixed variance", its Section VI.A);
``fixed_variance=True`` pools sigma over all candidates. Implemented: phi, the Gaussian
fit, the score, and the attack's AUC / TPR at 1% FPR given the reference states; how the
reference models are trained is the caller's (a recipe: see benchmarks/privacy.py and
tests/test_privacy_attacks.py).

Online (Algorithm 1 as written): the reference models are trained on random halves of a
pool that holds the candidates, so each candidate is IN for some of them and OUT for the
others (``inside[i, j]``: reference i trained on candidate j). Gaussians are fitted to
its IN and OUT confidences, and the score is the log likelihood ratio

    score = log N(phi_obs; mu_in, sigma_in^2) - log N(phi_obs; mu_out, sigma_out^2)

(per candidate variances, or with ``fixed_variance`` sigma_in and sigma_out each pooled
over all candidates). A candidate needs an IN and an OUT model (two of each for its own
variances). Not implemented: augmentation queries (several views of one example).

Written here rather than taken from a library: the paper's reference code is a research
script for image models, and the arithmetic is a few lines of numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedfm.attacks.membership import roc_auc, tpr_at_fpr
from fedfm.peft.state import set_state

MIN_STD = 1e-6  # a degenerate fit (identical reference confidences) is not a division by 0


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Phi(x) of the standard normal, in float64 (torch's ndtr; no scipy dependency)."""
    return torch.special.ndtr(torch.as_tensor(np.asarray(x, dtype=np.float64))).numpy()


def logit_scale(logits: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) per row, as z_y - logsumexp of the other logits."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    rows = np.arange(len(z))
    own = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    top = others.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(others - top).sum(axis=1))
    return own - lse


@torch.no_grad()
def confidences(workbench, state, examples: list[dict], batch_size: int = 64) -> np.ndarray:
    """phi of the model with trainable ``state`` on each example's own label."""
    set_state(workbench.model, workbench.full_state(state))
    model, task = workbench.model, workbench.task
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = task.collate(chunk, workbench.tokenizer)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().numpy()
        out.append(logit_scale(logits, [e["label"] for e in chunk]))
    return np.concatenate(out) if out else np.zeros(0)


def offline_scores(observed: np.ndarray, reference: np.ndarray, fixed_variance: bool = False) -> np.ndarray:
    """Offline LiRA score per candidate: Phi((phi_obs - mu_out) / sigma_out).
    ``observed``: (n,) target-model phi; ``reference``: (k, n) phi of k OUT models (k >= 2,
    or k >= 1 with ``fixed_variance`` and n >= 2). sigma is the population standard
    deviation (ddof 0, as the paper's code), per candidate or pooled over all of them."""
    obs = np.asarray(observed, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] != obs.shape[0]:
        raise ValueError(f"offline LiRA: reference must be (models, candidates) = (k, {obs.shape[0]}), got {ref.shape}")
    if ref.shape[0] < 2 and not fixed_variance:
        raise ValueError(f"offline LiRA: {ref.shape[0]} reference model(s) cannot give a per-example variance; use 2 or more, or fixed_variance")
    mu = ref.mean(axis=0)
    if fixed_variance:
        sigma = np.full_like(mu, np.sqrt(np.mean((ref - mu) ** 2)))
    else:
        sigma = ref.std(axis=0)
    return normal_cdf((obs - mu) / np.maximum(sigma, MIN_STD))


def _fit(ref: np.ndarray, mask: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate (column) mean and std of ``ref`` over the rows where ``mask`` holds;
    std pooled over every (row, column) in ``mask`` with ``fixed_variance``."""
    count = mask.sum(axis=0)
    mu = np.where(mask, ref, 0.0).sum(axis=0) / np.maximum(count, 1)
    dev = np.where(mask, (ref - mu) ** 2, 0.0)
    if fixed_variance:
        sigma = np.full_like(mu, np.sqrt(dev.sum() / max(int(mask.sum()), 1)))
    else:
        sigma = np.sqrt(dev.sum(axis=0) / np.maximum(count, 1))
    return mu, np.maximum(sigma, MIN_STD)


def online_scores(observed: np.ndarray, reference: np.ndarray, inside: np.ndarray, fixed_variance: bool = False) -> np.ndarray:
    """Online LiRA score per candidate: log N(phi_obs; mu_in, sigma_in^2) - log N(phi_obs;
    mu_out, sigma_out^2). ``reference``: (k, n) phi of k reference models; ``inside``:
    (k, n) bool, reference i trained on candidate j. Population standard deviations
    (ddof 0), per candidate or pooled."""
    obs = np.asarray(observed, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    inside = np.asarray(inside, dtype=bool)
    if ref.ndim != 2 or ref.shape[1] != obs.shape[0] or inside.shape != ref.shape:
        raise ValueError(f"online LiRA: reference and inside must be (models, candidates) = (k, {obs.shape[0]}), "
                         f"got {ref.shape} and {inside.shape}")
    least = 1 if fixed_variance else 2
    for name, mask in (("IN", inside), ("OUT", ~inside)):
        short = np.flatnonzero(mask.sum(axis=0) < least)
        if short.size:
            raise ValueError(f"online LiRA: candidate {int(short[0])} has {int(mask[:, short[0]].sum())} {name} reference "
                             f"model(s); it needs {least}" + ("" if fixed_variance else " (or fixed_variance)"))
    mu_in, sd_in = _fit(ref, inside, fixed_variance)
    mu_out, sd_out = _fit(ref, ~inside, fixed_variance)

    def log_pdf(x, mu, sd):
        return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd)

    return log_pdf(obs, mu_in, sd_in) - log_pdf(obs, mu_out, sd_out)


def online_lira_attack(workbench, target_state, reference_states: list, inside: np.ndarray, members: list[dict],
                       nonmembers: list[dict], fixed_variance: bool = False) -> dict[str, float]:
    """AUC and TPR@1%FPR of online LiRA against ``target_state``; ``inside[i, j]``: reference
    state i was trained on candidate j of ``members + nonmembers``."""
    candidates = members + nonmembers
    observed = confidences(workbench, target_state, candidates)
    reference = np.stack([confidences(workbench, s, candidates) for s in reference_states])
    scores = online_scores(observed, reference, inside, fixed_variance)
    sm, sn = scores[: len(members)], scores[len(members) :]
    return {"auc": roc_auc(sm, sn), "tpr_at_1pct_fpr": tpr_at_fpr(sm, sn, 0.01), "references": len(reference_states)}


def offline_lira_attack(workbench, target_state, reference_states: list, members: list[dict], nonmembers: list[dict],
                        fixed_variance: bool = False) -> dict[str, float]:
    """AUC and TPR@1%FPR of offline LiRA against ``target_state``; every reference state
    must come from a run that saw none of ``members`` and ``nonmembers``."""
    candidates = members + nonmembers
    observed = confidences(workbench, target_state, candidates)
    reference = np.stack([confidences(workbench, s, candidates) for s in reference_states])
    scores = offline_scores(observed, reference, fixed_variance)
    sm, sn = scores[: len(members)], scores[len(members) :]
    return {"auc": roc_auc(sm, sn), "tpr_at_1pct_fpr": tpr_at_fpr(sm, sn, 0.01), "references": len(reference_states)}
