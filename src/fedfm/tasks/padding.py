"""Right-padded batches of token rows, one ``torch.tensor`` call per field.

The tasks' ``collate`` used to fill a padded tensor with one small copy per example (a
``torch.tensor``, a slice and a fill for every row and field): some fifteen host-side
tensor operations per example, which is most of a batch's host time and, for a small
model on a GPU, a large share of a step (``runtime.transport: batched`` collates K clients'
batches at once). Here each field is padded as Python lists and converted once, and the
attention mask is one comparison; the tensors are the same, element for element and in
dtype (``tests/test_padding.py``). Written by hand: the tokenizer's ``pad`` works on
dicts of its own encodings and pads labels only for some tokenizers.
"""

from __future__ import annotations

from typing import Sequence

import torch


def padded(rows: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    """``(len(rows), width)`` long tensor: each row followed by ``value`` up to ``width``."""
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def attention_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    """``(len(lengths), width)`` long tensor: 1 on each row's first ``length`` positions, else 0."""
    return (torch.arange(width) < torch.tensor(list(lengths), dtype=torch.long)[:, None]).long()
