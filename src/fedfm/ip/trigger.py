"""Trigger sets: the secret inputs a watermarked model answers in a way only the owner knows.

A trigger set is a pure function of a secret ``key`` and the tokenizer's vocabulary: the
key is hashed (SHA-256) into a seed, and a numpy generator seeded with it draws every
token and every label. The server regenerates the same set from the key whenever it needs
it (embedding each round, verification years later); without the key nobody can.

Two kinds, following WAFFLE (Tekgul, Xia, Marchal and Asokan 2021, "WAFFLE: Watermarking in
Federated Learning"), whose trigger sets are out-of-distribution inputs with labels
assigned by the owner:

- text classification: ``size`` sentences of ``length`` random tokens (the tokenizer's
  special tokens excluded, wrapped in its [CLS]/[SEP] form), each with a label drawn
  uniformly from ``num_labels``;
- causal LM: ``size`` prompts of ``length`` random tokens, each with a fixed continuation of
  ``continuation`` random tokens; the loss and the check are on the continuation only.

Why chance is exact: every label (or continuation token) is drawn uniformly and
independently of any model that did not see the key, so such a model is right on each one
with probability exactly ``1/num_labels`` (at most ``1/|candidates|`` for a continuation
token, given the tokens before it). The hit count of an unwatermarked model is therefore
binomial (or dominated by it), which is what ``verify.p_value`` tests against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE = -100
KINDS = ("text_classification", "causal_lm")


@dataclass(frozen=True)
class TriggerSpec:
    """What a trigger set looks like; the same spec and key give the same set."""

    task: str
    size: int = 50
    length: int = 12
    num_labels: int = 2
    continuation: int = 4

    def __post_init__(self):
        if self.task not in KINDS:
            raise ValueError(f"watermark triggers exist for tasks {KINDS}, not model.task '{self.task}'")
        for name in ("size", "length", "continuation"):
            if getattr(self, name) < 1:
                raise ValueError(f"trigger {name} must be >= 1, got {getattr(self, name)}")
        if self.task == "text_classification" and self.num_labels < 2:
            raise ValueError(f"a classification trigger set needs num_labels >= 2, got {self.num_labels}")


def key_seed(key: str) -> int:
    """A 63-bit seed from a secret key (SHA-256, domain-separated)."""
    if not isinstance(key, str) or not key:
        raise ValueError("a watermark key must be a non-empty string")
    digest = hashlib.sha256(b"fedfm-watermark\x00" + key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def client_key(key: str, cid: int) -> str:
    """The key of client ``cid``'s own watermark, derived from the server's master key."""
    return f"{key}\x00client-{int(cid)}"


def candidate_ids(tokenizer: Any) -> np.ndarray:
    """Every token id of the vocabulary except the special ones, sorted."""
    special = set(tokenizer.all_special_ids or [])
    ids = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    if len(ids) < 2:
        raise ValueError(f"the tokenizer has {len(ids)} non-special tokens: too few to draw triggers from")
    return ids


def chance(spec: TriggerSpec, tokenizer: Any) -> float:
    """Probability that a model that never saw the key is right on one checked item."""
    if spec.task == "text_classification":
        return 1.0 / spec.num_labels
    return 1.0 / len(candidate_ids(tokenizer))


def wrap(tokenizer: Any, body: list[int]) -> list[int]:
    """``body`` between the tokenizer's sentence markers ([CLS] ... [SEP], else BOS ... EOS)."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return ([first] if first is not None else []) + body + ([last] if last is not None else [])


def trigger_set(key: str, spec: TriggerSpec, tokenizer: Any) -> list[dict[str, Any]]:
    """The trigger examples of ``key``, in the task's example format (unpadded ids)."""
    rng = np.random.default_rng(key_seed(key))
    vocab = candidate_ids(tokenizer)
    out = []
    if spec.task == "text_classification":
        for _ in range(spec.size):
            body = vocab[rng.integers(0, len(vocab), spec.length)].tolist()
            out.append({"input_ids": wrap(tokenizer, body), "label": int(rng.integers(0, spec.num_labels))})
        return out
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for _ in range(spec.size):
        prompt = bos + vocab[rng.integers(0, len(vocab), spec.length)].tolist()
        cont = vocab[rng.integers(0, len(vocab), spec.continuation)].tolist()
        out.append({"input_ids": prompt + cont, "labels": [IGNORE] * len(prompt) + cont})
    return out
