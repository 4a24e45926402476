"""SplitFed over exchange phases (learner and exchange ``splitfed``): the split round gives
the unsplit model's SGD step, every activation and gradient crosses the loop as its own
message with its bytes counted, and the config refuses what cannot work."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.config import ConfigError, from_dict
from fedfm.core.seeding import derive_seed
from fedfm.learners.splitfed import batch_items
from fedfm.peft.state import set_state
from fedfm.runtime import LocalRuntime

from conftest import tiny_config

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def splitfed_config(tmp_path, steps: int, roles: list[dict], **over) -> dict:
    raw = tiny_config(tmp_path, **{"learner": {"name": "splitfed"}, "peft.train_head": True, **over})
    raw["exchanges"] = [{"name": "splitfed", "steps": steps}]
    raw["federation"]["roles"] = roles
    return raw


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cut", [1, 2])
def test_one_split_round_is_the_unsplit_sgd_step(tmp_path, cut):
    # One client, one round, one local step, SGD lr 0.5, no dropout, no clipping: the new
    # global State must be init - 0.5 * grad of the whole (unsplit) model on that batch.
    raw = splitfed_config(
        tmp_path, 1, [{"name": "only", "count": 1, "profile": {"cut": cut}}],
        rounds=1, **{"federation.clients": 1, "train.optimizer": "sgd", "train.lr": 0.5, "train.max_grad_norm": None},
    )
    raw["model"]["config_overrides"].update(NO_DROPOUT)
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    init = rt.wb.initial_state()
    rt.run()
    row = rows(tmp_path / "run")[1]
    assert row["clients"] == [0] and row["failed"] == [] and row["rejected"] == []
    assert set(row["phase_bytes"]) == {"splitfed.1", "splitfed.2"}
    # the unsplit reference, on the same batch (the loop's seeded order: seed of round 1, client 0)
    wb, cfg = rt.wb, rt.exp.train
    items = batch_items(wb.examples(0), cfg, derive_seed(0, 1, 0), 1)
    batch = wb.task.collate(items, wb.tokenizer)
    model = wb.model
    set_state(model, init)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = wb.task.loss(model, batch)
    loss.backward()
    model.eval()
    want = {n: init[n] - 0.5 * p.grad for n, p in model.named_parameters() if p.requires_grad}
    got = rt.loop.final_state
    assert row["train_loss"] == pytest.approx(loss.item(), rel=1e-5)
    moved = [n for n in want if not torch.equal(want[n], init[n])]
    assert any(".embeddings." in n or ".layer.0." in n for n in moved)  # the client half moved
    assert any("classifier" in n for n in moved)  # and the server half
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-6), n


def test_bytes_per_round_match_the_hand_count(tmp_path):
    # Two clients (cuts 1 and 2), 2 split steps each. Per step a client sends its
    # activations h (B, T, 32) float32 = B*T*32*4 bytes, the mask (B, T) uint8 = B*T and
    # the labels (B,) int64 = 8*B, and receives dL/dh (B, T, 32) float32 = B*T*32*4; each
    # message adds one safetensors header (8-byte length + JSON). Phase 1 asks with a
    # header only; phase 3 sends the last gradient and gets the client-side delta back.
    raw = splitfed_config(tmp_path, 2, [{"name": "a", "count": 1, "profile": {"cut": 1}},
                                        {"name": "b", "count": 1, "profile": {"cut": 2}}], rounds=1,
                          server_steps=[{"name": "sim_clock", "seconds_per_step": 0.5}])
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    rt.run()
    row = rows(tmp_path / "run")[1]
    pb = row["phase_bytes"]
    wb, cfg = rt.wb, rt.exp.train
    shapes = {}  # (cid, step) -> (B, T)
    for cid in (0, 1):
        for k in (1, 2):
            b = wb.task.collate(batch_items(wb.examples(cid), cfg, derive_seed(0, 1, cid), k), wb.tokenizer)
            shapes[cid, k] = tuple(b["input_ids"].shape)
    assert all(B == 8 for B, _ in shapes.values())  # 20 examples per client, batch 8
    data_up = {k: sum(B * T * 32 * 4 + B * T + 8 * B for (c, s), (B, T) in shapes.items() if s == k) for k in (1, 2)}
    data_down = {k: sum(B * T * 32 * 4 for (c, s), (B, T) in shapes.items() if s == k - 1) for k in (2, 3)}
    for k in (1, 2):
        header = pb[f"splitfed.{k}"]["up"] - data_up[k]
        assert 2 * 100 <= header <= 2 * 320, (k, header)
    for k in (2, 3):
        header = pb[f"splitfed.{k}"]["down"] - data_down[k]
        assert 2 * 60 <= header <= 2 * 200, (k, header)
    assert pb["splitfed.1"]["down"] < 2 * 200  # headers only
    # exactly: the same messages rebuilt (zeros of the same shapes, the same meta)
    def size(tensors, meta):
        return len(to_bytes(Payload(tensors, meta)))
    t = "1.000000e+00"  # fixed width, like every client's reported seconds
    for k in (1, 2):
        want = sum(size({"h": torch.zeros(B, T, 32), "mask": torch.zeros(B, T, dtype=torch.uint8),
                         "labels": torch.zeros(B, dtype=torch.long)}, {"client_s": t})
                   for (c, s), (B, T) in shapes.items() if s == k)
        assert pb[f"splitfed.{k}"]["up"] == want
    for k in (2, 3):
        op = "step" if k == 2 else "end"
        want = sum(size({"grad": torch.zeros(B, T, 32)}, {"op": op, "step": str(k)}) for (c, s), (B, T) in shapes.items() if s == k - 1)
        assert pb[f"splitfed.{k}"]["down"] == want
    # the last reply is the client-side delta: cut 1 holds layer 0's 4 LoRA tensors, cut 2 all 8
    model = rt.loop.final_state
    client = {0: [n for n in model if ".layer.0." in n], 1: [n for n in model if ".layer." in n]}
    want_end = sum(size({n: torch.zeros_like(model[n]) for n in client[c]}, {"client_s": t}) for c in (0, 1))
    assert pb["splitfed.3"]["up"] == want_end
    # the train phase carried the client-side weights down, and an empty update up
    assert row["bytes_down"] - sum(p["down"] for p in pb.values()) > sum(model[n].numel() * 4 for c in (0, 1) for n in client[c])
    assert row["bytes_up"] - sum(p["up"] for p in pb.values()) < 2 * 1024
    # the simulated clock charges each client its phase messages, plus the weights it received
    # as one serialized payload: its 4 + 8 LoRA tensors' floats plus a header entry for each
    # (the tensor's long name, dtype, shape and offsets: 60 to 200 bytes)
    weights = sum(size({n: torch.zeros_like(model[n]) for n in client[c]}, {}) for c in (0, 1))
    assert 12 * 60 <= weights - sum(model[n].numel() * 4 for c in (0, 1) for n in client[c]) <= 12 * 200
    assert row["sim_clock.bytes_up.a"] + row["sim_clock.bytes_up.b"] == sum(p["up"] for p in pb.values())
    assert row["sim_clock.bytes_down.a"] + row["sim_clock.bytes_down.b"] == sum(p["down"] for p in pb.values()) + weights
    # 2 steps at 0.5 s at speed 1, plus the main server's measured seconds for that client (server_s)
    assert 2 * 0.5 < row["sim_clock.compute_s_max"] < 2 * 0.5 + 60


def test_config_refuses_what_cannot_work(tmp_path):
    raw = tiny_config(tmp_path, **{"learner": {"name": "splitfed"}})
    with pytest.raises(ConfigError, match="exchanges"):
        from_dict(raw)
    raw = tiny_config(tmp_path)
    raw["exchanges"] = [{"name": "splitfed", "steps": 2}]
    with pytest.raises(ConfigError, match="learner.name splitfed"):
        from_dict(raw)
    raw = splitfed_config(tmp_path, 2, [{"name": "a", "count": 1, "middleware": [{"name": "delay", "seconds": 1}]}])
    with pytest.raises(ConfigError, match="middleware"):
        from_dict(raw)
