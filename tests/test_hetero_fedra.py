"""FedRA: the per-round allocation and per-layer aggregation over contributors, by hand."""

from __future__ import annotations

import numpy as np
import torch

from fedfm.aggregators.fedavg import fedavg
from fedfm.aggregators.fedra import FedRAServer, allocation, allocation_matrix, per_layer_delta
from fedfm.peft.hetero import layer_of
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec, Update

L0, L1, HEAD = "m.layer.0.q.lora_A.default.weight", "m.layer.1.q.lora_A.default.weight", "classifier.weight"
T = torch.tensor


def test_per_layer_weights_count_only_contributors():
    # client 1 (1 example) trained layer 0: delta 2; client 2 (3 examples) layers 0 and 1: 6, 4
    # layer 0: (1*2 + 3*6) / 4 = 5; layer 1: only client 2 -> 4 (a zero-filled mean would give 3)
    # head (outside every layer, everyone): (1*1 + 3*5) / 4 = 4
    model = {L0: T([0.0]), L1: T([0.0]), HEAD: T([0.0])}
    p1 = {L0: T([2.0]), HEAD: T([1.0])}
    p2 = {L0: T([6.0]), L1: T([4.0]), HEAD: T([5.0])}
    delta, counts = per_layer_delta(model, [p1, p2], [1.0, 3.0], fedavg, None)
    assert torch.allclose(delta[L0], T([5.0])) and torch.allclose(delta[L1], T([4.0])) and torch.allclose(delta[HEAD], T([4.0]))
    assert counts == {"0": 2, "1": 1, "rest": 2}
    delta, counts = per_layer_delta(model, [p1], [1.0], fedavg, None)  # nobody trained layer 1
    assert torch.equal(delta[L1], T([0.0])) and counts["1"] == 0


def test_allocation_is_seeded_sized_and_distinct():
    a = allocation(seed=7, rnd=3, cid=2, count=3, total=6)
    assert len(a) == 3 and len(set(a)) == 3 and all(0 <= i < 6 for i in a) and a == sorted(a)
    assert a == allocation(7, 3, 2, 3, 6)  # the same in every process and on a retry
    rounds = {tuple(allocation(7, r, 2, 3, 6)) for r in range(1, 30)}
    assert len(rounds) > 1  # a fresh draw per round
    m = allocation_matrix(7, 3, {0: 1, 1: 2, 2: 6}, 6)
    assert m.shape == (3, 6) and m.sum(1).tolist() == [1, 2, 6] and np.all(m[2] == 1)


def test_server_half_sends_the_sub_model_and_accepts_the_allocated_layers():
    from fedfm.learners.fedra import FedRAParams

    model = {L0: T([1.0]), L1: T([1.0]), HEAD: T([1.0])}
    server = FedRAServer(None, 2)  # forward: allocated, the paper's sub-model
    server.init(model)
    ss = {MODEL: model}
    inst = server.instruction(5, ss, ClientSpec(0, [], {"layers": 1}), seed=0)
    mine = L0 if inst.config["layers"] == [0] else L1
    assert set(inst.state) == {mine, HEAD} and len(inst.config["layers"]) == 1  # its layer and the head only
    # both ends compute the names it receives from the instruction's plain config
    assert set(server.client_reference(0, {"layers": 1}, model, {"layers": inst.config["layers"]})) == {mine, HEAD}
    assert set(server.client_reference(0, {"layers": 1}, model, None)) == set(model)  # outside a round: the sizes only
    spec = server.client_payload_spec(inst, model)
    assert set(spec) == {HEAD, mine}
    ups = [Update(0, {k: torch.ones(1) for k in spec}, 2)]
    _, delta = server.combine_updates(ss, ups, fedavg, None, RoundContext(5, 0, torch.Generator(), 2, []))
    untouched = L1 if mine == L0 else L0
    assert torch.equal(delta[untouched], T([0.0])) and torch.equal(delta[HEAD], T([1.0]))
    full = FedRAServer(FedRAParams(forward="full"), 2)  # every layer runs: the whole State
    assert set(full.instruction(5, ss, ClientSpec(0, [], {"layers": 1}), seed=0).state) == set(model)
    assert set(full.client_reference(0, {"layers": 1}, model, {"layers": inst.config["layers"]})) == set(model)


def _fedra_client(tmp_path, forward: str, layers: list[int]):
    """One client update of a 4-layer tiny BERT with LoRA, told to train ``layers``; returns
    (update, calls per layer of the forward passes, the workbench)."""
    from collections import Counter

    from conftest import tiny_config

    from fedfm.config import from_dict
    from fedfm.core.types import Instruction
    from fedfm.learners.fedra import FedRALearner, FedRAParams
    from fedfm.peft.layer_stack import layer_stack
    from fedfm.runtime.workbench import Workbench

    raw = tiny_config(tmp_path, **{"model.config_overrides.num_hidden_layers": 4, "train.steps": 2})
    raw["learner"] = {"name": "fedra", "forward": forward}
    wb = Workbench(from_dict(raw))
    stack = layer_stack(wb.model, "test")[2]
    calls = Counter()
    hooks = [m.register_forward_hook(lambda *_, i=i: calls.update([i])) for i, m in enumerate(stack)]
    try:
        inst = Instruction(round=1, cid=0, state=wb.initial_state(), config={"layers": layers})
        up = FedRALearner(FedRAParams(forward=forward)).local_update(inst, wb.context(0, 1))
    finally:
        for h in hooks:
            h.remove()
    assert layer_stack(wb.model, "test")[2] is stack  # the whole stack is back
    assert all(p.requires_grad for n, p in wb.model.named_parameters() if "lora_" in n)  # and every flag
    return up, dict(calls), wb


def test_the_allocated_sub_model_runs_only_its_layers(tmp_path):
    # layers 1 and 3 of 4, 2 steps: the paper's sub-model runs layers 1 and 3 once a step, never 0 or 2
    up, calls, _ = _fedra_client(tmp_path, "allocated", [3, 1])
    assert calls == {1: 2, 3: 2}
    assert {layer_of(k) for k in up.payload} == {1, 3, None} and up.metrics["layers"] == 2.0
    assert all(bool(up.payload[k].any()) for k in up.payload if ".lora_B." in k)  # both layers trained
    # forward: full runs every layer, the unallocated ones frozen: the same payload names
    full, calls, _ = _fedra_client(tmp_path, "full", [3, 1])
    assert calls == {0: 2, 1: 2, 2: 2, 3: 2} and set(full.payload) == set(up.payload)


def test_a_model_without_a_layer_stack_is_refused_for_the_sub_model():
    import pytest

    from fedfm.learners.fedra import check_stack

    with pytest.raises(ValueError, match=r"learner fedra \(forward: allocated; forward: full runs every layer and needs none\): "
                                         r"the model has no layer stack"):
        check_stack(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fedra_with_a_soft_prompt_is_refused_before_training(tmp_path, monkeypatch):
    import yaml
    from conftest import invoke, tiny_config

    raw = tiny_config(tmp_path, **{"peft": {"method": "prompt_tuning", "num_virtual_tokens": 4}, "learner": {"name": "fedra"}})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    result, out = invoke(monkeypatch, "check", str(path))
    assert result.exit_code == 1 and "learner fedra: no trainable State name carries a layer index" in out, out


def test_a_sub_model_client_is_sent_its_layers_only_on_every_transport(tmp_path):
    """4 layers, each of 2 clients trains 1: the broadcast holds 1 layer's LoRA and the head,
    not 4 layers'; the processes transport (the broadcast decoded in a worker, its names
    from the instruction's config) gives the sequential run's rows."""
    import json

    from conftest import tiny_config

    from fedfm.config import from_dict
    from fedfm.runtime.local import LocalRuntime

    def run(name, **over):
        raw = tiny_config(tmp_path, rounds=2, **{"model.config_overrides.num_hidden_layers": 4, "train.steps": 2,
                                                 "federation.roles": [{"name": "one", "count": 2, "profile": {"layers": 1}}],
                                                 "runtime": {"progress": False, "threads": 1}, **over})
        LocalRuntime(from_dict(raw), tmp_path / name).run()
        return [{k: v for k, v in json.loads(x).items() if k != "wall_s"} for x in open(tmp_path / name / "metrics.jsonl")]

    sub = run("sub", learner={"name": "fedra"})
    full = run("full", learner={"name": "fedra", "forward": "full"})
    # LoRA r 4 on query and value: a layer's 2 x (4x32 + 32x4) = 512 floats = 2,048 bytes. Each client
    # is sent 3 layers fewer: 2 x 3 x 2,048 = 12,288 bytes of floats a round, and 2 x 12 tensors'
    # entries fewer in the safetensors header (name, dtype, shape, offsets: under 200 bytes each)
    saved = [f["bytes_down"] - s["bytes_down"] for s, f in zip(sub[1:], full[1:])]
    assert all(12_288 < d < 12_288 + 24 * 200 for d in saved), saved
    workers = run("workers", learner={"name": "fedra"},
                  runtime={"progress": False, "threads": 1, "transport": "processes", "workers": 2})
    # every field, the upload's size too: its header carries the measured step_s at a fixed width
    assert workers == sub


def test_measured_seconds_travel_at_a_fixed_width():
    from fedfm.runtime.wire import metric_text

    assert metric_text("step_s", 0.1) == "1.000000e-01" and metric_text("step_s", 0.0123456789) == "1.234568e-02"
    assert len(metric_text("step_s", 3.0)) == len(metric_text("step_s", 1 / 3)) == 12
    assert metric_text("loss", 1 / 3) == "0.3333333333333333" and metric_text("steps", 2.0) == "2.0"  # exact


def test_a_sub_model_client_gets_the_downlink_delta_for_what_it_held_before(tmp_path):
    """4 layers, each of 2 clients trains 1 a round: with codecs.down [delta] every round's
    sub-model decodes (per tensor: test_codecs_chain.py) and the client's reconstruction
    keeps the head and every layer it was sent so far."""
    import json

    from conftest import tiny_config

    from fedfm.config import from_dict
    from fedfm.runtime.local import LocalRuntime

    raw = tiny_config(tmp_path, rounds=3, **{"model.config_overrides.num_hidden_layers": 4, "train.steps": 1,
                                             "federation.roles": [{"name": "one", "count": 2, "profile": {"layers": 1}}],
                                             "learner": {"name": "fedra"}, "codecs.down": [{"delta": True}],
                                             "peft.train_head": True})
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    rt.run()
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")][1:]
    assert all(r["failed"] == [] and r["rejected"] == [] and sorted(r["clients"]) == [0, 1] for r in rows)
    held = rt.store.get(0, "down_last")  # client 0's reconstruction: the head and every layer it was sent so far
    assert any(".classifier." in n for n in held) and 1 <= len({n.split(".layer.")[1].split(".")[0] for n in held if ".layer." in n}) <= 3
