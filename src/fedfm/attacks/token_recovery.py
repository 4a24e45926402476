"""Which tokens a client trained on, read off the word-embedding rows of its update.

Melis et al. 2019, "Exploiting Unintended Feature Leakage in Collaborative Learning"
(the bag of words of a batch from the embedding gradient), and the first step of FILM
(Gupta et al. 2022, "Recovering Private Text in Federated Learning of Language Models"):
the gradient of the loss w.r.t. the word-embedding matrix E is non-zero only in the rows
of the token ids that occur in the batch (row ``t`` of dL/dE is the sum of dL/de over the
positions holding token ``t``). An update computed with SGD or Adam(W) without weight
decay therefore changes exactly the rows of the tokens in the client's training text of
that round (Adam's moments of a row that never had a gradient stay zero), so the set of
non-zero rows of the update's embedding delta is the client's bag of words. Implemented:
that set (``recover_tokens``), the true set of a batch (``batch_tokens``, the ids the
task's collate gives, padding excluded) and precision / recall.

What it needs: the word embeddings trained and sent (``peft.method: full``). Under LoRA
on query/value the update holds no embedding rows at all (``embedding_name`` finds none)
and this attack recovers nothing; the head bias still gives the labels
(``label_recovery``). With weight decay every row moves, so the exact-zero test fails; a
relative threshold ``tol`` (rows whose L2 norm exceeds ``tol`` times the largest row's)
is the attacker's fallback. Not implemented: ordering the tokens into sentences (FILM's
beam search with a language model).
"""

from __future__ import annotations

import torch

from fedfm.core.types import State

EMBEDDING_NAMES = ("word_embeddings", "embed_tokens", "wte")


def embedding_name(payload: State) -> str | None:
    """The word-embedding matrix in ``payload`` (a 2-D tensor whose name says so), or None."""
    names = [k for k, v in payload.items() if v.ndim == 2 and any(n in k for n in EMBEDDING_NAMES)]
    if len(names) > 1:
        raise ValueError(f"token recovery: several word-embedding matrices in the update: {names}")
    return names[0] if names else None


def recover_tokens(payload: State, tol: float = 0.0) -> set[int]:
    """Token ids whose embedding row changed: row norm > ``tol`` x the largest row norm
    (``tol`` 0: exactly non-zero). Empty when the update carries no word embeddings."""
    name = embedding_name(payload)
    if name is None:
        return set()
    norms = payload[name].double().norm(dim=1)
    top = float(norms.max()) if norms.numel() else 0.0
    if top == 0.0:
        return set()
    return {int(i) for i in torch.nonzero(norms > tol * top).flatten()}


def batch_tokens(workbench, examples: list[dict]) -> set[int]:
    """The ids of the tokens the model reads for ``examples`` (the task's own collate;
    positions with attention mask 0, i.e. padding, excluded)."""
    batch = workbench.task.collate(examples, workbench.tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return {int(t) for t in ids[mask.bool()].flatten()}


def precision_recall(recovered: set[int], truth: set[int]) -> dict[str, float]:
    """Precision (of the recovered ids, the fraction in the batch; 1.0 when none are
    recovered, as nothing wrong was claimed) and recall (of the batch's ids, the fraction
    recovered)."""
    hit = len(recovered & truth)
    return {
        "precision": hit / len(recovered) if recovered else 1.0,
        "recall": hit / len(truth) if truth else 1.0,
        "recovered": len(recovered),
        "true": len(truth),
    }
