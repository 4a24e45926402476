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

Pattern triggers (``kind="pattern"``, text classification only): WAFFLEPattern adapted to
text. WAFFLE's image "WAFFLEPattern" triggers draw a class-specific secret pattern on
random-noise backgrounds, so the model learns a feature shared by many triggers instead of
memorizing arbitrary input/label pairs. Here the key draws ``patterns`` secret patterns,
each ``pattern_tokens`` random tokens at random positions of the ``length``-token body and
a label of its own (uniform over ``num_labels``); each pattern appears in
``fillers_per_pattern`` triggers whose other positions are fresh random filler tokens. The
set is ordered pattern by pattern (triggers ``j*F .. j*F+F-1`` carry pattern ``j``), which
is how ``verify`` groups them. Triggers that share a pattern are not independent under the
null hypothesis (a clean model that happens to react to a pattern's tokens answers all of
its triggers alike), so verification counts one vote per pattern, not one hit per trigger
(``verify.pattern_votes``). Not from the paper: drawing many patterns (the paper has one
per class), which is what makes the per-pattern count a binomial over ``patterns`` items.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE = -100
KINDS = ("text_classification", "causal_lm")
TRIGGERS = ("random", "pattern")


@dataclass(frozen=True)
class TriggerSpec:
    """What a trigger set looks like; the same spec and key give the same set.

    ``kind="random"``: ``size`` independent random-token triggers. ``kind="pattern"``:
    ``patterns`` secret patterns of ``pattern_tokens`` tokens, each in
    ``fillers_per_pattern`` triggers (``size`` is not used)."""

    task: str
    size: int = 50
    length: int = 12
    num_labels: int = 2
    continuation: int = 4
    kind: str = "random"
    patterns: int = 64
    pattern_tokens: int = 3
    fillers_per_pattern: int = 4

    def __post_init__(self):
        if self.task not in KINDS:
            raise ValueError(f"watermark triggers exist for tasks {KINDS}, not model.task '{self.task}'")
        if self.kind not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}, got '{self.kind}'")
        for name in ("size", "length", "continuation", "patterns", "pattern_tokens", "fillers_per_pattern"):
            if getattr(self, name) < 1:
                raise ValueError(f"trigger {name} must be >= 1, got {getattr(self, name)}")
        if self.task == "text_classification" and self.num_labels < 2:
            raise ValueError(f"a classification trigger set needs num_labels >= 2, got {self.num_labels}")
        if self.kind == "pattern":
            if self.task != "text_classification":
                raise NotImplementedError(
                    f"pattern triggers are implemented for text_classification only, not model.task '{self.task}'; "
                    "use trigger: random")
            if self.pattern_tokens >= self.length:
                raise ValueError(f"pattern_tokens {self.pattern_tokens} must be < trigger_length {self.length} "
                                 "(the other positions hold the random fillers)")

    @property
    def examples(self) -> int:
        """Trigger examples in the set."""
        return self.patterns * self.fillers_per_pattern if self.kind == "pattern" else self.size

    @property
    def items(self) -> int:
        """Independent items verification counts: triggers, or patterns (one vote each)."""
        return self.patterns if self.kind == "pattern" else self.size


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
    if spec.kind == "pattern":
        return pattern_set(rng, vocab, spec, tokenizer)
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


def pattern_set(rng: np.random.Generator, vocab: np.ndarray, spec: TriggerSpec, tokenizer: Any) -> list[dict[str, Any]]:
    """Pattern triggers, pattern by pattern: for each of ``spec.patterns`` patterns, its
    positions, tokens and label, then ``spec.fillers_per_pattern`` triggers with fresh fillers."""
    out = []
    for _ in range(spec.patterns):
        positions = np.sort(rng.choice(spec.length, spec.pattern_tokens, replace=False))
        tokens = vocab[rng.integers(0, len(vocab), spec.pattern_tokens)]
        label = int(rng.integers(0, spec.num_labels))
        for _ in range(spec.fillers_per_pattern):
            body = vocab[rng.integers(0, len(vocab), spec.length)]
            body[positions] = tokens
            out.append({"input_ids": wrap(tokenizer, body.tolist()), "label": label})
    return out
