"""HetLoRA (zero-padding aggregation, truncation, self-pruning) and FlexLoRA (SVD
redistribution) on small matrices, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.aggregators.fedavg import fedavg
from fedfm.aggregators.flexlora import FlexLoraServer, flexlora_delta
from fedfm.aggregators.hetlora import GROUP, HetLoraServer, zero_pad_delta
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec, Update
from fedfm.learners.hetrank import HetLoraParams, hetlora_learner
from fedfm.peft.hetero import pad, svd_factors, truncate

A, B, H = "m.layer.0.q.lora_A.default.weight", "m.layer.0.q.lora_B.default.weight", "head.weight"
T = torch.tensor


def clients_modules():
    # client 1, rank 1, 1 example:  A1 = [[1, 2]], B1 = [[3], [4]], head 1
    # client 2, rank 2, 3 examples: A2 = I, B2 = 2 I, head 5
    m1 = {A: T([[1.0, 2.0]]), B: T([[3.0], [4.0]]), H: T([1.0])}
    m2 = {A: T([[1.0, 0.0], [0.0, 1.0]]), B: T([[2.0, 0.0], [0.0, 2.0]]), H: T([5.0])}
    return m1, m2


def zero_model():
    return {A: torch.zeros(2, 2), B: torch.zeros(2, 2), H: torch.zeros(1)}


def test_zero_pad_aggregation_by_hand_examples_weighting():
    # pad(A1) = [[1, 2], [0, 0]], pad(B1) = [[3, 0], [4, 0]]; weights 1/4, 3/4:
    # A = ([[1, 2], [0, 0]] + 3 I) / 4 = [[1, 0.5], [0, 0.75]]
    # B = ([[3, 0], [4, 0]] + 6 I) / 4 = [[2.25, 0], [1, 1.5]];  head = (1 + 15) / 4 = 4
    model = zero_model()
    delta = zero_pad_delta(model, list(clients_modules()), [1.0, 3.0], "examples", fedavg, None)
    new = {k: model[k] + delta[k] for k in model}
    assert torch.allclose(new[A], T([[1.0, 0.5], [0.0, 0.75]]))
    assert torch.allclose(new[B], T([[2.25, 0.0], [1.0, 1.5]]))
    assert torch.allclose(new[H], T([4.0]))
    # truncation to rank 1 for the next rank-1 client: the first row of A, first column of B
    low = truncate(new, 1)
    assert torch.allclose(low[A], T([[1.0, 0.5]])) and torch.allclose(low[B], T([[2.25], [1.0]]))
    assert torch.equal(pad(low, 2)[A], T([[1.0, 0.5], [0.0, 0.0]]))


def test_zero_pad_aggregation_sparsity_weighting():
    # ||B1 A1||_F = ||[[3, 6], [4, 8]]|| = sqrt(125); ||B2 A2|| = ||2 I|| = sqrt(8)
    p1 = math.sqrt(125) / (math.sqrt(125) + math.sqrt(8))  # 0.79810
    p2 = 1 - p1
    model = zero_model()
    delta = zero_pad_delta(model, list(clients_modules()), [1.0, 3.0], "sparsity", fedavg, None)
    assert torch.allclose(delta[A], T([[1.0, 2 * p1], [0.0, p2]]), atol=1e-6)
    assert torch.allclose(delta[B], T([[3 * p1 + 2 * p2, 0.0], [4 * p1, 2 * p2]]), atol=1e-6)
    assert torch.allclose(delta[H], T([4.0]))  # the head keeps example weights


class P:
    weighting = "examples"


def test_hetlora_server_truncates_rebuilds_and_keeps_pruned_ranks():
    model = {A: T([[1.0, 1.0], [2.0, 2.0]]), B: T([[1.0, 3.0], [1.0, 3.0]]), H: T([0.0])}
    server = HetLoraServer(P(), num_clients=2)
    ss = {MODEL: model, **server.init(model)}
    specs = [ClientSpec(0, [], {"rank": 1}), ClientSpec(1, [], {"rank": 2})]
    inst = {c.cid: server.instruction(1, ss, c, seed=0) for c in specs}
    assert inst[0].state[A].shape == (1, 2) and inst[0].state[B].shape == (2, 1) and inst[0].config == {"rank": 1}
    assert torch.equal(inst[0].state[A], T([[1.0, 1.0]])) and torch.equal(inst[0].state[B], T([[1.0], [1.0]]))
    assert server.client_reference(0, {"rank": 1}, model)[A].shape == (1, 2)
    m1, m2 = clients_modules()
    ups = [
        Update(0, {k: m1[k] - inst[0].state[k] for k in m1}, 1),  # deltas against what was sent
        Update(1, {k: m2[k] - inst[1].state[k] for k in m2}, 3, {"hetlora_rank": 1.0}),
    ]
    ctx = RoundContext(1, 0, torch.Generator(), 2, specs)
    groups, delta = server.combine_updates(ss, ups, fedavg, None, ctx)
    new = {k: model[k] + delta[k] for k in model}
    assert torch.allclose(new[A], T([[1.0, 0.5], [0.0, 0.75]])) and torch.allclose(new[B], T([[2.25, 0.0], [1.0, 1.5]]))
    assert groups[GROUP]["rank"].tolist() == [0.0, 1.0]  # client 1 pruned to rank 1
    ss2 = {MODEL: new, **groups}
    again = server.instruction(2, ss2, specs[1], seed=0)
    # wire shape stays the tier's rank 2; the pruned component travels as zeros
    assert again.config == {"rank": 1} and torch.equal(again.state[A], T([[1.0, 0.5], [0.0, 0.0]]))


def test_flexlora_svd_reproduces_dw_exactly_at_full_rank():
    dw = T([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [4.0, 0.0, 1.0], [1.0, 1.0, 1.0]]).double()
    b, a = svd_factors(dw, 3)  # full rank: min(4, 3)
    assert b.shape == (4, 3) and a.shape == (3, 3)
    assert torch.allclose(b @ a, dw, atol=1e-12)
    b2, a2 = svd_factors(dw, 2)  # best rank-2 approximation: the error is the third singular value
    s = torch.linalg.svdvals(dw)
    assert torch.linalg.matrix_norm(dw - b2 @ a2).item() == pytest.approx(s[2].item(), rel=1e-9)
    b5, a5 = svd_factors(dw, 5)  # above min(out, in): zero components
    assert b5.shape == (4, 5) and torch.allclose(b5 @ a5, dw, atol=1e-12)


def test_flexlora_aggregates_full_size_products_and_redistributes():
    # client 1 (rank 1): B1 A1 = [[1], [0]] [[1, 0]] = [[1, 0], [0, 0]]
    # client 2 (rank 2): B2 A2 = I [[0, 0], [0, 2]] = [[0, 0], [0, 2]]
    # equal weights: dW = [[0.5, 0], [0, 1]]; singular values 1 (e2), 0.5 (e1)
    model = zero_model()
    t1 = {A: T([[1.0, 0.0]]), B: T([[1.0], [0.0]]), H: T([2.0])}
    t2 = {A: T([[0.0, 0.0], [0.0, 2.0]]), B: T([[1.0, 0.0], [0.0, 1.0]]), H: T([4.0])}
    delta = flexlora_delta(model, [t1, t2], [1.0, 1.0], fedavg, None)
    new = {k: model[k] + delta[k] for k in model}
    assert torch.allclose(new[B] @ new[A], T([[0.5, 0.0], [0.0, 1.0]]), atol=1e-6)  # exact at r_max = 2
    low = truncate(new, 1)  # what a rank-1 client receives: the best rank-1 part
    assert torch.allclose(low[B] @ low[A], T([[0.0, 0.0], [0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(new[H], T([3.0]))
    server = FlexLoraServer(None, 2)
    inst = server.instruction(2, {MODEL: new}, ClientSpec(0, [], {"rank": 1}), seed=0)
    assert inst.state[A].shape == (1, 2) and torch.allclose(inst.state[B] @ inst.state[A], low[B] @ low[A])


# -- the client half on a tiny LoRA model -------------------------------------------------


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.query = torch.nn.Linear(4, 4)
        self.classifier = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(torch.relu(self.query(x)))


class TinyTask:
    def collate(self, items, tokenizer):
        return {"x": torch.stack([i["x"] for i in items]), "y": torch.tensor([i["y"] for i in items])}

    def loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def tiny_ctx(cid=0):
    from peft import LoraConfig, get_peft_model

    from fedfm.config import TrainConfig
    from fedfm.learners.base import LocalContext

    torch.manual_seed(0)
    model = get_peft_model(TinyNet(), LoraConfig(r=4, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"]))
    gen = torch.Generator().manual_seed(1)
    examples = [{"x": torch.randn(4, generator=gen), "y": i % 2} for i in range(8)]
    train = TrainConfig(lr=0.05, steps=4, batch_size=4)
    return LocalContext(cid=cid, model=model, task=TinyTask(), tokenizer=None, examples=examples, train=train, seed=0)


def received_rank2(ctx):
    from fedfm.core.types import Instruction
    from fedfm.peft.state import get_state

    full = get_state(ctx.model)
    full = {k: (torch.full_like(v, 0.5) if ".lora_B." in k else v) for k, v in full.items()}  # B nonzero
    return Instruction(round=1, cid=0, state=truncate(full, 2))


def lora_names(ctx):
    a = next(n for n, _ in ctx.model.named_parameters() if ".lora_A." in n)
    return a, a.replace(".lora_A.", ".lora_B.")


def test_client_trains_its_rank_view_and_the_rest_stays_zero():
    ctx = tiny_ctx()
    inst = received_rank2(ctx)
    up = hetlora_learner(HetLoraParams()).local_update(inst, ctx)
    a, b = lora_names(ctx)
    assert up.payload[a].shape == (2, 4) and up.payload[b].shape == (4, 2)
    assert up.payload[a].abs().sum() > 0  # it trained
    params = dict(ctx.model.named_parameters())
    assert torch.equal(params[a][2:], torch.zeros(2, 4)) and torch.equal(params[b][:, 2:], torch.zeros(4, 2))
    assert up.metrics["steps"] == 4 and up.metrics["step_s"] > 0 and up.metrics["rank"] == 2


def test_self_pruning_lowers_the_rank_and_zeroes_the_pruned_components():
    # gamma 0.5 on rank 2: the tail is component 1; lam 100 drives its norm down -> rank 1
    ctx = tiny_ctx()
    inst = received_rank2(ctx)
    up = hetlora_learner(HetLoraParams(prune=True, gamma=0.5, lam=100.0)).local_update(inst, ctx)
    a, b = lora_names(ctx)
    assert up.metrics["hetlora_rank"] == 1.0
    trained_a = inst.state[a] + up.payload[a]
    trained_b = inst.state[b] + up.payload[b]
    assert torch.equal(trained_a[1], torch.zeros(4)) and torch.equal(trained_b[:, 1], torch.zeros(4))
    assert trained_a[0].abs().sum() > 0


def test_self_pruning_cannot_fire_while_the_received_b_is_zero():
    # round 1: peft's B = 0, so the received tail norm ||B[:, 1:2] A[1:2, :]||_F is 0 and
    # training cannot lower it; the client keeps rank 2 even with a strong regularizer
    from fedfm.core.types import Instruction
    from fedfm.peft.state import get_state

    ctx = tiny_ctx()
    state = truncate(get_state(ctx.model), 2)
    a, b = lora_names(ctx)
    assert torch.equal(state[b], torch.zeros(4, 2))
    up = hetlora_learner(HetLoraParams(prune=True, gamma=0.5, lam=100.0)).local_update(Instruction(round=1, cid=0, state=state), ctx)
    assert up.metrics["hetlora_rank"] == 2.0 and up.metrics["rank"] == 2.0
    assert all(torch.isfinite(t).all() for t in up.payload.values())
    assert up.payload[b][:, 1].abs().sum() > 0  # the tail component trained, and was kept
