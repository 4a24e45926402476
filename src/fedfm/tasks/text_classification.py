"""Sequence classification with a Hugging Face encoder (e.g. all-MiniLM-L6-v2).

Examples are tokenized once, unpadded; batches are padded to their longest member
(dynamic padding), which is what makes CPU training of short texts affordable.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from fedfm.tasks.base import register_task
from fedfm.tasks.class_tally import ClassTally
from fedfm.tasks.limits import check_max_length, model_prompt_positions, position_limit
from fedfm.tasks.loading import load_auto
from fedfm.tasks.padding import attention_mask, padded


class TextClassification:
    """Cross-entropy over ``num_labels`` classes; metrics: loss, accuracy and balanced
    accuracy (tasks/class_tally.py)."""

    finish = None  # a Task hook this task does not use
    max_positions: int | None = None  # the model's position table, once built
    virtual_tokens: int = 0  # positions a peft soft prompt takes before the text, once tuned

    def build(self, model_cfg: Any, seed: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if model_cfg.num_labels is None:
            raise ValueError(
                "model.num_labels is not set: set it, or infer it from the data first "
                "(fedfm.data.resolve_labels, which `fedfm run` calls)"
            )
        model, directory = load_auto(
            AutoModelForSequenceClassification, model_cfg, seed, num_labels=model_cfg.num_labels
        )
        tokenizer = AutoTokenizer.from_pretrained(directory)
        self.max_positions = position_limit(model.config)
        return model, tokenizer

    def bind_initial(self, model: torch.nn.Module, initial: Any) -> None:
        """The tuned model, once (``runtime/workbench.py``): the positions its soft prompt
        takes, counted against the position table when encoding."""
        self.virtual_tokens = model_prompt_positions(model)

    def encode(self, frame: pd.DataFrame, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        check_max_length(max_length, self.max_positions, prompt=self.virtual_tokens)
        enc = tokenizer(
            list(frame["text"].astype(str)), truncation=True, max_length=max_length, padding=False
        )
        labels = frame["label"].astype(int).tolist()
        return [{"input_ids": ids, "label": y} for ids, y in zip(enc["input_ids"], labels)]

    def collate(self, examples: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        width = max(lengths)
        ids = padded([e["input_ids"] for e in examples], width, tokenizer.pad_token_id or 0)  # (B, T)
        mask = attention_mask(lengths, width)  # (B, T)
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)  # (B,)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches) -> dict[str, float]:
        tally = ClassTally()
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            tally.add(logits.float(), batch["labels"])  # (B, C)
        return tally.metrics()


register_task("text_classification", TextClassification)
