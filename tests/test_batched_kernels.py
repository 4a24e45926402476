"""The batched transport's adapter kernels (``runtime.batch_kernel``: peft/multi_lora.py)
and per-client gradient clipping (learners/multi_lora.py), by hand and against
sequential training."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedfm.config import from_dict
from fedfm.core.types import Instruction
from fedfm.learners import multi_lora
from fedfm.learners.local import LocalLearner
from fedfm.learners.multi_lora import clip_per_client, train_jointly
from fedfm.peft.multi_lora import AdapterBatch, stacked_linear
from fedfm.runtime.batched import resolve_kernel
from fedfm.runtime.workbench import Workbench

pytestmark = pytest.mark.usefixtures("one_thread")

NO_DROPOUT = {"model.config_overrides.hidden_dropout_prob": 0.0, "model.config_overrides.attention_probs_dropout_prob": 0.0}
ATOL = 5e-5  # as in tests/test_batched_transport.py (measured differences there)


def test_stacked_linear_by_hand():
    # 4 examples, 2 adapters with 2 examples each: rows 0-1 use W0, rows 2-3 use W1
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[[1.0, 1.0]], [[2.0, -1.0]]])  # (K=2, out=1, in=2)
    bias = torch.tensor([[10.0], [20.0]])
    # W0: 1+2, 3+4 = 3, 7; W1: 2*1 - 0 = 2, 0 - 1 = -1; plus the biases 10 and 20
    assert torch.equal(stacked_linear(x, w, bias), torch.tensor([[13.0], [17.0], [22.0], [19.0]]))
    assert torch.equal(stacked_linear(x, w), torch.tensor([[3.0], [7.0], [2.0], [-1.0]]))
    x3 = x.reshape(4, 1, 2).expand(4, 3, 2)  # a sequence dimension: every position alike
    assert torch.equal(stacked_linear(x3, w, bias), torch.tensor([[13.0], [17.0], [22.0], [19.0]]).reshape(4, 1, 1).expand(4, 3, 1))


def test_kernel_choice():
    on_cpu = torch.nn.Linear(2, 2)
    assert resolve_kernel("auto", on_cpu) == "segments"  # CUDA would give "stacked"
    assert resolve_kernel("stacked", on_cpu) == "stacked"
    ab = AdapterBatch(torch.nn.Sequential(torch.nn.Linear(2, 1)), ["0.weight", "0.bias"])
    st = {"0.weight": torch.ones(1, 2), "0.bias": torch.zeros(1)}
    ab.bind([st, st], torch.tensor([0, 0, 1]), kernel="stacked")
    assert ab.bounds == [(0, 2), (2, 3)] and not ab.uniform  # 2 and 1 examples: not one size, so segments
    ab.bind([st, st], torch.tensor([0, 1]), kernel="stacked")
    assert ab.uniform and ab.stacked["0.weight"].shape == (2, 1, 2)
    with pytest.raises(ValueError, match="kernel must be one of \\['segments', 'stacked'\\], got 'fast'"):
        ab.bind([st], torch.tensor([0]), kernel="fast")


def test_clip_per_client_equals_torch_clipping_per_group():
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 8), (8, 4), (2,), (3, 5)]

    def groups(scales):  # one client per scale: its gradients' sizes set by the scale
        out = []
        for s in scales:
            g = [torch.zeros(sh, requires_grad=True) for sh in shapes]
            for p in g:
                p.grad = torch.randn(p.shape, generator=gen) * s
            out.append(g)
        return out

    mine = groups([0.01, 1.0, 5.0])  # the first is below max_norm 1.0: left as it is
    ref = [[p.detach().clone().requires_grad_(True) for p in g] for g in mine]
    for g, r in zip(mine, ref):
        for p, q in zip(g, r):
            q.grad = p.grad.clone()
    before = [p.grad.clone() for p in mine[0]]
    clip_per_client(mine, 1.0)
    for r in ref:
        torch.nn.utils.clip_grad_norm_(r, 1.0)
    for g, r in zip(mine, ref):
        for p, q in zip(g, r):
            assert torch.equal(p.grad, q.grad)
    assert all(torch.equal(p.grad, b) for p, b in zip(mine[0], before))
    # after clipping, each clipped client's total norm is max_norm (to the 1e-6 of the formula)
    for g in mine[1:]:
        assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g])).item() == pytest.approx(1.0, abs=1e-5)
    # a group with a missing gradient: each group clipped by torch's own function
    odd = groups([3.0, 3.0])
    odd[1][0].grad = None
    clip_per_client(odd, 1.0)
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in odd[0]])).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_stacked_kernel_with_one_leaf_per_name_matches_sequential(tmp_path, monkeypatch, optimizer):
    # Three clients with 24 examples each (3 steps per epoch each): every client steps at
    # every joint step, so the stacked kernel keeps each name's three tensors as one
    # (3, *shape) leaf (learners/multi_lora.py shared_leaves) and clips by rows.
    raw = tiny_config(tmp_path, **NO_DROPOUT, **{
        "federation.clients": 3, "train.optimizer": optimizer, "train.momentum": 0.9 if optimizer == "sgd" else 0.0,
        "train.weight_decay": 0.1, "train.max_grad_norm": 0.05})
    wb = Workbench(from_dict(raw))
    jobs = []
    for cid in range(3):
        ctx = wb.context(cid, 1)
        ctx.examples = ctx.examples[:24]
        jobs.append((Instruction(round=1, cid=cid, state=wb.initial_state()), ctx))
    calls = []
    real = multi_lora.clip_stacked
    monkeypatch.setattr(multi_lora, "clip_stacked", lambda leaves, m: (calls.append([tuple(p.shape) for p in leaves]), real(leaves, m)))
    sequential = [LocalLearner().local_update(inst, ctx) for inst, ctx in jobs]
    batched = train_jointly(jobs, kernel="stacked")
    assert len(calls) == 6 and all(shape[0] == 3 for shape in calls[0])  # 2 epochs x 3 joint steps, leaves (3, ...)
    for seq, (upd, _) in zip(sequential, batched):
        assert upd.metrics == pytest.approx(seq.metrics, rel=1e-5)
        for k, v in seq.payload.items():
            assert torch.allclose(upd.payload[k], v, rtol=0, atol=ATOL), (k, (upd.payload[k] - v).abs().max().item())
    # unequal step counts, or the segments kernel: one tensor per client and name, as before
    jobs[0][1].examples = jobs[0][1].examples[:10]
    calls.clear()
    train_jointly(jobs, kernel="stacked")
    train_jointly(jobs[1:], kernel="segments")
    assert calls == []


def test_clip_stacked_by_hand():
    # two clients, two names: client 0's rows (3, 4) and (0,) -> norm 5, clipped to 1 (x 1/5);
    # client 1's rows (0.3, 0) and (0.4,) -> norm 0.5, below 1: unchanged
    a = torch.zeros(2, 2, requires_grad=True)
    b = torch.zeros(2, 1, requires_grad=True)
    a.grad = torch.tensor([[3.0, 4.0], [0.3, 0.0]])
    b.grad = torch.tensor([[0.0], [0.4]])
    multi_lora.clip_stacked([a, b], 1.0)
    assert torch.allclose(a.grad, torch.tensor([[0.6, 0.8], [0.3, 0.0]]), atol=1e-6)
    assert torch.allclose(b.grad, torch.tensor([[0.0], [0.4]]))
