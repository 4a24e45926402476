"""Masked language modelling for encoders: the objective of federated domain-adaptive
pre-training (DAPT) on the clients' unlabeled text (Gururangan et al. 2020, "Don't Stop
Pretraining: Adapt Language Models to Domains and Tasks"; the masking of Devlin et al.
2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding").

``model.task: masked_lm`` builds ``AutoModelForMaskedLM`` (for MiniLM, whose package holds
no MLM head, the head starts from random init), encodes the ``text`` column (labels, if
any, are ignored), and masks 15% of the non-special tokens of each example (at least one):
80% become ``[MASK]``, 10% a random token, 10% stay; the loss is the cross-entropy on the
masked positions. Metrics: ``loss`` and ``accuracy`` (masked tokens predicted exactly).
A row with no token to mask (an empty text) is refused, naming the data rows: a batch of
such rows would have no masked position and a NaN loss.

The masking is *static* (as in the original BERT data pipeline): drawn from a generator
seeded by the example's own token ids, so the same example is masked alike in every
process, every epoch and every evaluation, whatever the global RNG state. Written by hand
for that reason: ``transformers.DataCollatorForLanguageModeling`` draws from the global
torch RNG.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedfm.tasks.base import register_task
from fedfm.tasks.limits import check_max_length, model_prompt_positions, position_limit
from fedfm.tasks.loading import load_auto
from fedfm.tasks.padding import attention_mask, padded

MASK_PROB = 0.15
IGNORE = -100


def example_seed(ids: list[int]) -> int:
    return zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes())


def mask_example(ids: list[int], special: set[int], mask_id: int, vocab: int, prob: float = MASK_PROB) -> tuple[list[int], list[int]]:
    """(masked input ids, labels): labels hold the original id at masked positions, -100 elsewhere."""
    gen = torch.Generator().manual_seed(example_seed(ids))
    candidates = [i for i, t in enumerate(ids) if t not in special]
    if not candidates:
        return list(ids), [IGNORE] * len(ids)
    draw = torch.rand(len(candidates), generator=gen)
    chosen = [c for c, u in zip(candidates, draw.tolist()) if u < prob]
    if not chosen:
        chosen = [candidates[int(torch.argmin(draw))]]
    inputs, labels = list(ids), [IGNORE] * len(ids)
    kind = torch.rand(len(chosen), generator=gen).tolist()
    randoms = torch.randint(0, vocab, (len(chosen),), generator=gen).tolist()
    for pos, u, r in zip(chosen, kind, randoms):
        labels[pos] = ids[pos]
        if u < 0.8:
            inputs[pos] = mask_id
        elif u < 0.9:
            inputs[pos] = r
    return inputs, labels


class MaskedLM:
    """Cross-entropy on the masked tokens; metrics: loss and masked-token accuracy."""

    finish = None  # a Task hook this task does not use
    max_positions: int | None = None  # the model's position table, once built
    virtual_tokens: int = 0  # positions a peft soft prompt takes before the text, once tuned

    def build(self, model_cfg: Any, seed: int):
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        model, directory = load_auto(AutoModelForMaskedLM, model_cfg, seed)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if tokenizer.mask_token_id is None:
            raise ValueError(f"model.task masked_lm: the tokenizer of {directory} has no mask token")
        self.max_positions = position_limit(model.config)
        return model, tokenizer

    def bind_initial(self, model: torch.nn.Module, initial: Any) -> None:
        """The tuned model, once (``runtime/workbench.py``): the positions a soft prompt
        takes, counted against the position table when encoding."""
        self.virtual_tokens = model_prompt_positions(model)

    def encode(self, frame: pd.DataFrame, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        check_max_length(max_length, self.max_positions, prompt=self.virtual_tokens)
        enc = tokenizer(list(frame["text"].astype(str)), truncation=True, max_length=max_length, padding=False)
        special = set(tokenizer.all_special_ids)
        vocab = len(tokenizer)
        out, empty = [], []
        for i, ids in zip(frame.index, enc["input_ids"]):
            inputs, labels = mask_example(ids, special, tokenizer.mask_token_id, vocab)
            if all(y == IGNORE for y in labels):
                empty.append(int(i) + 1)
            out.append({"input_ids": inputs, "labels": labels})
        if empty:  # a batch of such rows has no masked token: a NaN loss
            raise ValueError(f"model.task masked_lm: {len(empty)} row(s) (data rows {', '.join(map(str, empty[:5]))}, "
                             "counted from 1) have no token to mask (an empty text): fill or drop them")
        return out

    def collate(self, examples: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        width = max(lengths)
        ids = padded([e["input_ids"] for e in examples], width, tokenizer.pad_token_id or 0)  # (B, T)
        labels = padded([e["labels"] for e in examples], width, IGNORE)  # (B, T)
        return {"input_ids": ids, "attention_mask": attention_mask(lengths, width), "labels": labels}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches) -> dict[str, float]:
        total, correct, loss_sum = 0, 0, 0.0
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"].flatten()  # (B*T,)
            flat = logits.flatten(0, 1)  # (B*T, V)
            keep = labels != IGNORE
            loss_sum += torch.nn.functional.cross_entropy(flat[keep], labels[keep], reduction="sum").item()
            correct += (flat[keep].argmax(-1) == labels[keep]).sum().item()
            total += int(keep.sum())
        return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}


register_task("masked_lm", MaskedLM)
