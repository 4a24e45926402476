"""Which tokens a client trained on, read off the word-embedding rows of its update.

Melis et al. 2019, "Exploiting Unintended Feature Leakage in Collaborative Learning"
(the bag of words of a batch from the embedding gradient), and the first step of FILM
(Gupta et al. 2022, "Recovering Private Text in Federated Learning of Language Models"):
when E is used as the *input* embedding only, the gradient of the loss w.r.t. E is
non-zero only in the rows of the token ids that occur in the batch (row ``t`` of dL/dE is
the sum of dL/de over the positions holding token ``t``). An update computed with SGD or
Adam(W) without weight decay then changes exactly the rows of the tokens in the client's
training text of that round (Adam's moments of a row that never had a gradient stay
zero), so the set of non-zero rows of the update's embedding delta is the client's bag of
words. Implemented: that set (``recover_tokens``), the true set of a batch
(``batch_tokens``, the ids the task's collate gives, padding excluded) and precision /
recall.

That holds for untied embeddings only (encoders with a classification head, causal LMs
with a separate output matrix; for a causal LM, the last token of a sequence is only a
target, its own position predicting nothing, so its row moves only if it occurs earlier). A causal-LM head *tied* to the input embeddings (GPT-2,
and most small causal LMs) uses E again as the output layer, whose softmax over the whole
vocabulary sends a gradient to every row: one SGD step of a tiny tied GPT-2 (vocabulary
100) on 5 distinct tokens changes all 100 rows. ``recover_tokens(..., model=model)``
refuses such a model (``tied_embeddings``) with an error saying so; a relative threshold
``tol`` separated the batch's rows on that random-init model (row norms >= 0.23 of the
largest against <= 0.013), but nothing bounds the output-layer gradient of a token the
model predicts confidently, so it is not offered as a recovery for tied embeddings.

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


def tied_embeddings(model) -> bool:
    """Whether the (transformers) model's output embedding matrix IS its input one."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def recover_tokens(payload: State, tol: float = 0.0, model=None) -> set[int]:
    """Token ids whose embedding row changed: row norm > ``tol`` x the largest row norm
    (``tol`` 0: exactly non-zero). Empty when the update carries no word embeddings.
    Pass the ``model`` the update was trained on: tied input/output embeddings (every row
    gets an output-layer gradient) are refused with a ValueError."""
    if model is not None and tied_embeddings(model):
        raise ValueError(
            "token recovery: the model's input embeddings are tied to its output layer (the LM head), whose "
            "softmax gradient reaches every vocabulary row, so the changed rows are not the batch's tokens")
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
