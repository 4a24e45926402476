"""Label recovery from the classification head in one client's update.

iDLG (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients"): for one example
with cross-entropy, the gradient w.r.t. the head's bias is p - onehot(y), negative only
at the true label. An update of one SGD step is -lr times that gradient, so the label is
the argmax of the head-bias delta. For a batch of B the bias gradient is
mean_i p_i - counts / B, so counts = B * (p_bar - g) (the count estimate of Wainakh et
al. 2022, "User-Level Label Leakage from Gradients in Federated Learning", LLG), with
p_bar the mean predicted distribution, estimated by the attacker from the global model
on data of its own. Both are computed from the delta of the head bias only, which every
PEFT method of fedfm trains and sends (the head is trainable under LoRA too).

The tokens of a batch, from the word-embedding rows of the update: ``token_recovery``.
"""

from __future__ import annotations

import numpy as np
import torch

from fedfm.core.types import State
from fedfm.peft.state import set_state


def head_bias_name(payload: State, num_labels: int) -> str:
    """The name of the classification head's bias: the one 1-D tensor of size num_labels
    whose name says classifier/score (fedfm's text-classification heads)."""
    names = [k for k, v in payload.items() if v.ndim == 1 and v.numel() == num_labels and ("classifier" in k or "score" in k)]
    if len(names) != 1:
        raise ValueError(f"label recovery: expected one classification-head bias of size {num_labels}, found {names}")
    return names[0]


def bias_gradient(delta: torch.Tensor, lr: float) -> np.ndarray:
    """The head-bias gradient of one plain SGD step: delta = -lr * grad."""
    return -delta.double().numpy() / lr


def single_label(delta: torch.Tensor) -> int:
    """iDLG: the label of a one-example, one-SGD-step update (the only positive delta)."""
    return int(torch.argmax(delta))


def label_counts(grad: np.ndarray, batch_size: int, mean_probs: np.ndarray) -> np.ndarray:
    """LLG-style counts per label: B * (p_bar - g), rounded, clipped at 0."""
    return np.clip(np.rint(batch_size * (np.asarray(mean_probs) - grad)), 0, None).astype(int)


@torch.no_grad()
def mean_probs(workbench, state, examples: list[dict]) -> np.ndarray:
    """The global model's mean predicted distribution on the attacker's own examples."""
    set_state(workbench.model, workbench.full_state(state))
    model, task = workbench.model, workbench.task
    batch = task.collate(examples, workbench.tokenizer)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return torch.softmax(logits, -1).mean(0).double().numpy()
