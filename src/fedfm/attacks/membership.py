"""Membership inference by a loss threshold (Yeom et al. 2018, "Privacy Risk in Machine
Learning: Analyzing the Connection to Overfitting"), and the two figures that report an
attack: ROC AUC and the true-positive rate at a low false-positive rate (Carlini et al.
2022, "Membership Inference Attacks From First Principles", who argue for TPR at 1% FPR).

The attacker scores each candidate example by minus the federated model's loss on it (a
training example tends to have a lower loss) and calls it a member above a threshold.
The calibrated attack (reference models, offline LiRA) is ``attacks/lira.py``.

``roc_auc`` and ``tpr_at_fpr`` are pure functions of the two score lists; scores are
"higher means member".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedfm.peft.state import set_state


def roc_auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(member score > non-member score) + 0.5 P(tie): the Mann-Whitney form of the AUC."""
    m, n = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("roc_auc needs at least one member and one non-member score")
    greater = (m[:, None] > n[None, :]).sum()
    ties = (m[:, None] == n[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(m) * len(n)))


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], fpr: float = 0.01) -> float:
    """The largest TPR of a rule "member iff score > tau" whose FPR is at most ``fpr``."""
    m, n = np.asarray(members, dtype=np.float64), np.sort(np.asarray(nonmembers, dtype=np.float64))[::-1]
    allowed = int(np.floor(fpr * len(n) + 1e-12))  # false positives the rate allows
    tau = n[allowed] if allowed < len(n) else -np.inf
    return float((m > tau).mean())


@torch.no_grad()
def example_losses(workbench, state, examples: list[dict]) -> np.ndarray:
    """The loss of the model with trainable ``state`` on each example (one at a time)."""
    set_state(workbench.model, workbench.full_state(state))  # into the one base model
    model, task = workbench.model, workbench.task
    model.eval()
    return np.array([float(task.loss(model, task.collate([e], workbench.tokenizer))) for e in examples])


def loss_threshold_attack(workbench, state, members: list[dict], nonmembers: list[dict]) -> dict[str, float]:
    """AUC and TPR@1%FPR of the loss-threshold attack on ``state``."""
    sm, sn = -example_losses(workbench, state, members), -example_losses(workbench, state, nonmembers)
    return {"auc": roc_auc(sm, sn), "tpr_at_1pct_fpr": tpr_at_fpr(sm, sn, 0.01)}
