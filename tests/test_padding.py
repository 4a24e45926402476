"""tasks/padding.py: padded token rows and attention masks, by hand and against the
per-example fill the tasks' collate used before."""

from __future__ import annotations

import torch

from fedfm.tasks.padding import attention_mask, padded


def _per_example(rows, width, value):  # the former construction: one copy per row
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def test_padded_and_mask_by_hand():
    rows = [[101, 7, 102], [101, 102], [101, 5, 6, 102]]
    ids = padded(rows, 4, 0)
    assert ids.dtype == torch.long and ids.tolist() == [[101, 7, 102, 0], [101, 102, 0, 0], [101, 5, 6, 102]]
    assert padded([[1, 2]], 2, -100).tolist() == [[1, 2]]  # nothing to pad
    assert padded([[5]], 3, -100).tolist() == [[5, -100, -100]]
    mask = attention_mask([3, 2, 4], 4)
    assert mask.dtype == torch.long and mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_same_tensors_as_one_copy_per_example():
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 30000, (int(n),), generator=gen).tolist() for n in torch.randint(1, 40, (33,), generator=gen)]
    width = max(len(r) for r in rows)
    for value in (0, -100):
        got, want = padded(rows, width, value), _per_example(rows, width, value)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    want_mask = _per_example([[1] * len(r) for r in rows], width, 0)
    assert torch.equal(attention_mask([len(r) for r in rows], width), want_mask)
