"""The batched transport (runtime/batched.py): several clients' LoRA in one forward pass
(peft/multi_lora.py, learners/multi_lora.py), against sequential training."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Instruction
from fedfm.learners.local import LocalLearner
from fedfm.learners.middleware import register_middleware
from fedfm.learners.multi_lora import train_jointly
from fedfm.peft.multi_lora import AdapterBatch, gather_linear, lora_delta, segments_of
from fedfm.runtime.batched import BatchedTransport
from fedfm.runtime.batched_eval import evaluate_jointly
from fedfm.runtime.local import LocalRuntime
from fedfm.runtime.transport import InProcessTransport
from fedfm.runtime.workbench import Workbench

pytestmark = pytest.mark.usefixtures("one_thread")

NO_DROPOUT = {"model.config_overrides.hidden_dropout_prob": 0.0, "model.config_overrides.attention_probs_dropout_prob": 0.0}
# Measured (tiny model, dropout off, 1 thread, the joint test below): the largest difference between a
# batched and a sequential client update was 0.0 (per-segment path; 2.3e-7 with AdamW and 9.3e-10 with SGD
# through the stacked path; 2.5e-6 and 1.9e-9 through the gather + bmm path) for updates up to 0.14; all toy examples have one length, so no padding differs;
# the bound leaves a margin for other BLAS builds.
ATOL = 5e-5


class Truncate:
    """Keeps the first 10 examples (a client with fewer steps than the others)."""

    def __init__(self, params=None):
        pass

    def before_train(self, examples, ctx):
        return examples[:10]

    def after_train(self, update, ctx):
        return update


class Refuse(Truncate):
    def before_train(self, examples, ctx):
        raise RuntimeError("client refuses to train")


class BadLabel(Truncate):
    """Examples with a label outside the head's 2 classes: the loss raises in the joint step."""

    def before_train(self, examples, ctx):
        return [{**e, "label": 7} for e in examples]


register_middleware("test_truncate10", Truncate)
register_middleware("test_refuse", Refuse)
register_middleware("test_bad_label", BadLabel)


# -- the per-example adapter gather, by hand ------------------------------------------------


def test_gather_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # 2 examples, in = 2
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (K=2, r=1, in=2): A0 = [1, 0], A1 = [0, 1]
    b = torch.tensor([[[1.0], [2.0]], [[3.0], [-1.0]]])  # (K=2, out=2, r=1): B0 = [1, 2]^T, B1 = [3, -1]^T
    idx = torch.tensor([1, 0])  # example 0 uses client 1's adapter, example 1 client 0's
    # example 0: x A1^T = 2, times B1^T = [6, -2], times 0.5 = [3, -1]
    # example 1: x A0^T = 3, times B0^T = [3, 6], times 0.5 = [1.5, 3]
    assert torch.equal(lora_delta(x, a, b, idx, 0.5), torch.tensor([[3.0, -1.0], [1.5, 3.0]]))
    w = torch.tensor([[[1.0, 1.0]], [[2.0, -1.0]]])  # (K=2, out=1, in=2)
    bias = torch.tensor([[10.0], [20.0]])
    # example 0 (client 1): 2*1 - 1*2 + 20 = 20; example 1 (client 0): 3 + 4 + 10 = 17
    assert torch.equal(gather_linear(x, w, idx, bias), torch.tensor([[20.0], [17.0]]))
    x3 = x.reshape(2, 1, 2).expand(2, 3, 2)  # a sequence dimension: every position alike
    assert torch.equal(gather_linear(x3, w, idx, bias), torch.tensor([[[20.0]] * 3, [[17.0]] * 3]))


def test_segments_of():
    assert segments_of(torch.tensor([0, 0, 1, 2, 2]), 3) == [(0, 2), (2, 3), (3, 5)]
    assert segments_of(torch.tensor([0, 1, 0]), 2) is None  # not grouped
    assert segments_of(torch.tensor([0, 0, 2]), 3) is None  # adapter 1 has no example
    assert segments_of(torch.tensor([1, 1]), 2) is None  # not in adapter order


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.query = torch.nn.Linear(2, 2, bias=False)
        self.classifier = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.classifier(self.query(x))


def test_adapter_batch_on_a_peft_layer_by_hand():
    from peft import LoraConfig, get_peft_model

    base = TwoLayer()
    with torch.no_grad():
        base.query.weight.copy_(torch.eye(2))
    model = get_peft_model(base, LoraConfig(r=1, lora_alpha=1, target_modules=["query"], modules_to_save=["classifier"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    pre = "base_model.model."
    assert sorted(names) == sorted([pre + "query.lora_A.default.weight", pre + "query.lora_B.default.weight",
                                    pre + "classifier.modules_to_save.default.weight", pre + "classifier.modules_to_save.default.bias"])

    def state(a, b, w, c):
        return {pre + "query.lora_A.default.weight": torch.tensor([a], requires_grad=True),
                pre + "query.lora_B.default.weight": torch.tensor(b, requires_grad=True),
                pre + "classifier.modules_to_save.default.weight": torch.tensor([w], requires_grad=True),
                pre + "classifier.modules_to_save.default.bias": torch.tensor([c], requires_grad=True)}

    s0 = state([1.0, 0.0], [[1.0], [2.0]], [1.0, 1.0], 0.0)  # scale = alpha / r = 1
    s1 = state([0.0, 1.0], [[3.0], [-1.0]], [1.0, -1.0], 5.0)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with AdapterBatch(model, names) as ab:
        ab.bind([s1, s0], torch.tensor([0, 1]))  # grouped by adapter: the per-segment path
        assert ab.bounds == [(0, 1), (1, 2)]
        y_segments = model(x)
        ab.bind([s1, s0], torch.tensor([0, 1]), kernel="stacked")  # grouped, one example each: two bmm per layer
        assert ab.uniform
        y_stacked = model(x)
        ab.bind([s0, s1], torch.tensor([1, 0]))  # not grouped: the gather + bmm path
        assert ab.bounds is None
        y = model(x)
        with pytest.raises(RuntimeError, match="has first dimension 3, not the batch of 2"):
            model(torch.ones(3, 2))
    # example 0, client 1: query = x + (x A1^T) B1^T = [1, 2] + 2 * [3, -1] = [7, 0]; head [1, -1] . [7, 0] + 5 = 12
    # example 1, client 0: query = [3, 4] + 3 * [1, 2] = [6, 10]; head [1, 1] . [6, 10] + 0 = 16
    assert torch.equal(y, torch.tensor([[12.0], [16.0]]))
    assert torch.equal(y_segments, y) and torch.equal(y_stacked, y)
    y[0].sum().backward()  # example 0 only: client 0's tensors get no gradient
    assert all(t.grad is None or not t.grad.any() for t in s0.values())
    assert s1[pre + "classifier.modules_to_save.default.bias"].grad.item() == 1.0
    # outside the context the model is the plain peft model again (B starts at zero: the base layer alone)
    assert torch.allclose(model(x), model.base_model.model.classifier(x))


def test_unsupported_trainable_parameter_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    with pytest.raises(NotImplementedError, match=r"'1.weight' is neither a LoRA factor nor an nn.Linear"):
        AdapterBatch(model, [n for n, _ in model.named_parameters()])


# -- the joint training against the local learner --------------------------------------------


@pytest.mark.parametrize("optimizer, switches, kernel", [
    ("adamw", {}, "segments"),
    ("sgd", {}, "segments"),
    ("adamw", {"train.autocast": "bf16", "train.bucket_by_length": True}, "segments"),  # both switches honoured per client
    ("adamw", {}, "stacked"),
    ("sgd", {}, "stacked"),
    ("adamw", {"train.autocast": "bf16", "train.bucket_by_length": True}, "stacked"),
])
def test_joint_updates_match_sequential_updates(tmp_path, optimizer, switches, kernel):
    # Three clients, one with 10 examples (2 steps per epoch against the others' 10): it is
    # idle for most joint steps and must not be stepped then (weight decay and momentum
    # would move it). max_grad_norm 0.05 makes per-client clipping fire.
    raw = tiny_config(tmp_path, **NO_DROPOUT, **{
        "federation.clients": 3,
        "train.optimizer": optimizer, "train.momentum": 0.9 if optimizer == "sgd" else 0.0,
        "train.weight_decay": 0.1, "train.max_grad_norm": 0.05, **switches})
    wb = Workbench(from_dict(raw))
    jobs = []
    for cid in range(3):
        ctx = wb.context(cid, 1)
        if cid == 0:
            ctx.examples = ctx.examples[:10]
        jobs.append((Instruction(round=1, cid=cid, state=wb.initial_state()), ctx))
    sequential = [LocalLearner().local_update(inst, ctx) for inst, ctx in jobs]
    batched = train_jointly(jobs, kernel=kernel)
    for seq, (upd, trained) in zip(sequential, batched):
        assert upd.cid == seq.cid and upd.num_examples == seq.num_examples
        assert set(upd.metrics) == set(seq.metrics) == {"train_loss", "steps", "examples_seen"}
        assert (upd.metrics["steps"], upd.metrics["examples_seen"]) == (seq.metrics["steps"], seq.metrics["examples_seen"])
        assert upd.metrics["train_loss"] == pytest.approx(seq.metrics["train_loss"], rel=1e-5)
        assert list(upd.payload) == list(seq.payload)
        for k, v in seq.payload.items():
            assert upd.payload[k].shape == v.shape and upd.payload[k].dtype == v.dtype, k
            assert torch.allclose(upd.payload[k], v, rtol=0, atol=ATOL), (k, (upd.payload[k] - v).abs().max().item())
            assert torch.allclose(trained[k], jobs[upd.cid][0].state[k] + upd.payload[k], rtol=0, atol=1e-7)
    # 2 epochs of ceil(n / 8) batches: client 0 (10 examples) does 4 steps, the others more
    assert [u.metrics["steps"] for u in sequential] == [2.0 * -(-len(ctx.examples) // 8) for _, ctx in jobs]
    assert sequential[0].metrics["steps"] == 4.0 < min(u.metrics["steps"] for u in sequential[1:])


def test_joint_evaluation_matches_per_client_evaluation(tmp_path):
    # Three personalized models (the template with each client's own perturbation) on
    # held-out lists of 5, 12 and 3 examples (eval batches of 4: 2, 3 and 1 batches, so
    # clients drop out of later joint passes).
    wb = Workbench(from_dict(tiny_config(tmp_path, **{"eval.batch_size": 4})))
    gen = torch.Generator().manual_seed(0)
    states = [{k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in wb.initial_state().items()} for _ in range(3)]
    pool = wb.examples(0)
    items = [pool[:5], pool[5:17], pool[17:20]]
    joint = evaluate_jointly(wb, states, items)
    for state, its, got in zip(states, items, joint):
        want = wb.evaluate(state, wb.batches(its))
        assert set(got) == set(want) == {"loss", "accuracy", "balanced_accuracy"}
        assert got["accuracy"] == want["accuracy"] and got["balanced_accuracy"] == want["balanced_accuracy"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert len({round(m["loss"], 6) for m in joint}) == 3  # three different models were evaluated


# -- the transport in a run -------------------------------------------------------------------


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, key=""):
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    elif isinstance(a, dict):
        assert set(a) == set(b), key
        for k in a:
            _close(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{key}[{i}]")
    else:
        assert a == b, key


def test_batched_run_matches_sequential_run(tmp_path):
    # Local heads (peft.local -> the client store), per-client evaluation through the
    # transport (evaluate phase, one client at a time), 3 clients in chunks of 2 and 1.
    over = {**NO_DROPOUT, "federation.clients": 3, "federation.client_holdout": 0.2, "eval.clients": "all",
            "peft.local": ["*classifier.*"], "runtime.threads": 1}
    seq = LocalRuntime(from_dict(tiny_config(tmp_path, **over)), tmp_path / "seq")
    assert isinstance(seq.transport, InProcessTransport)
    seq.run()
    bat = LocalRuntime(from_dict(tiny_config(tmp_path, **over, **{"runtime.transport": "batched", "runtime.batch_clients": 2})),
                       tmp_path / "bat")
    assert isinstance(bat.transport, BatchedTransport)
    bat.run()
    assert bat.transport.chunks == [[0, 1], [2], [0, 1], [2]]  # 2 rounds
    assert bat.transport.eval_chunks and all(c in ([0, 1], [2]) for c in bat.transport.eval_chunks)
    for k, v in seq.final_state.items():
        assert torch.allclose(v, bat.final_state[k], rtol=0, atol=ATOL), k
    rows_seq, rows_bat = _rows(tmp_path / "seq"), _rows(tmp_path / "bat")
    assert len(rows_seq) == len(rows_bat) == 3
    for a, b in zip(rows_seq, rows_bat):
        a.pop("wall_s"), b.pop("wall_s")
        a.pop("peak_rss_mb", None), b.pop("peak_rss_mb", None)
        assert a.get("bytes_down") == b.get("bytes_down")
        # The payloads have the same names, shapes and dtypes (tested above); an update's
        # metadata carries its train loss as decimal text, whose length may differ by a
        # byte or two where the losses differ in the last digits (here they do not).
        up_a, up_b = a.pop("bytes_up", 0), b.pop("bytes_up", 0)
        assert abs(up_a - up_b) <= 4 * len(a["clients"]), (up_a, up_b)
        assert (up_b > 0) == (a["round"] > 0)
        for x in (a, b):
            x.get("codec_bytes", {}).get("up", {}).pop("input", None)
        _close(a, b)  # same keys, clients, failures, bytes down; losses and accuracies to float rounding
    assert rows_bat[1]["failed"] == [] and rows_bat[1]["clients"] == [0, 1, 2]
    heads = sorted((tmp_path / "bat" / "clients").rglob("*.safetensors"))
    assert len(heads) == len(sorted((tmp_path / "seq" / "clients").rglob("*.safetensors"))) > 0


def test_failures_prepare_fails_one_client_joint_step_fails_its_chunk(tmp_path):
    raw = tiny_config(tmp_path, **{
        "rounds": 1, "federation.clients": 5, "runtime.transport": "batched", "runtime.batch_clients": 2,
        "federation.roles": [{"name": "refuser", "cids": [1], "middleware": [{"name": "test_refuse"}]},
                             {"name": "bad", "cids": [2], "middleware": [{"name": "test_bad_label"}]}],
    })
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    summary = rt.run()
    row = _rows(tmp_path / "run")[1]
    failed = {f["cid"]: f["error"] for f in row["failed"]}
    # chunk [0, 1]: client 1 fails in before_train, client 0 trains alone;
    # chunk [2, 3]: client 2's labels make the joint step raise, so 2 and 3 both fail;
    # chunk [4]: trains.
    assert failed[1] == "RuntimeError: client refuses to train"
    assert set(failed) == {1, 2, 3}
    assert "in the joint training step of clients [2, 3]" in failed[2] and failed[3] == failed[2]
    assert row["clients"] == [0, 4]
    assert rt.transport.chunks == [[0], [2, 3], [4]]
    assert summary["final"]["accuracy"] is not None


@pytest.mark.parametrize("over, message", [
    ({"runtime.batch_clients": 0}, "runtime.batch_clients"),
    ({"peft.method": "bitfit"}, "runtime.transport: batched (several clients' LoRA in one forward pass) needs peft.method: lora"),
    ({"learner.name": "fedprox", "learner.mu": 0.01}, "trains the 'local' learner only (got learner.name 'fedprox')"),
    ({"learner.name": "dp_sgd"}, "trains the 'local' learner only"),
    ({"train.compile": True}, "does not support train.compile"),
    ({"runtime.backend": "flower"}, "is the local backend's transport; runtime.backend is 'flower'"),
    ({"model.task": "masked_lm"}, "supports model.task ['text_classification'] (got 'masked_lm')"),
    ({"runtime.transport": "sequential", "runtime.batch_kernel": "stacked"},
     "runtime.batch_kernel: stacked needs runtime.transport: batched (got 'sequential')"),
    ({"runtime.batch_kernel": "fast"}, "runtime.batch_kernel"),
    ({"runtime.transport": "processes", "runtime.batch_clients": 8},
     "runtime.batch_clients: 8 needs runtime.transport: batched (got 'processes')"),
])
def test_config_refusals(tmp_path, over, message):
    raw = tiny_config(tmp_path, **{"runtime.transport": "batched", **over})
    if over.get("peft.method") == "bitfit":
        raw["peft"] = {"method": "bitfit"}
    with pytest.raises((ConfigError, ValueError), match=re.escape(message)):
        from_dict(raw)
