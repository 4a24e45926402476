"""FedKSeed: hand-checked coefficients and payload bytes (up and down); the server's model is
the replay of its checkpointed history, and a freshly started client rebuilds it bit for
bit from the history rows it is sent."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fedfm.aggregators.fedkseed import GRADS, SEEDS, round_coefficients
from fedfm.aggregators.fedkseed_sync import HistoryRows, KnownRows, sparse_rows
from fedfm.aggregators.zo_replay import replay, round_delta, seed_pool
from fedfm.codecs import CodecChain, CodecContext
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import MODEL, Instruction
from fedfm.learners import build_learner
from fedfm.runtime.local import LocalRuntime
from fedfm.runtime.store import ClientStore

from conftest import finished_run, tiny_config

K, STEPS = 16, 3


def test_round_coefficients_by_hand():
    # client A (1 example): seeds [0, 2, 0], grads [1, 2, 3]; client B (3 examples): seed [1], grad [4]
    # weights 1/4, 3/4; lr 0.5:
    #   c0 = -0.5 * 0.25 * (1 + 3) = -0.5;  c1 = -0.5 * 0.75 * 4 = -1.5;  c2 = -0.5 * 0.25 * 2 = -0.25
    a = {SEEDS: torch.tensor([0, 2, 0]), GRADS: torch.tensor([1.0, 2.0, 3.0])}
    b = {SEEDS: torch.tensor([1]), GRADS: torch.tensor([4.0])}
    c = round_coefficients([a, b], [1.0, 3.0], 3, 0.5)
    assert c.tolist() == [-0.5, -1.5, -0.25]
    with pytest.raises(ValueError, match="outside 0..2"):
        round_coefficients([{SEEDS: torch.tensor([3]), GRADS: torch.tensor([1.0])}], [1.0], 3, 0.5)


def test_payload_bytes_by_hand():
    # 200 steps: seeds int64 (8 B) + grads float32 (4 B) = 200 * 12 = 2400 B of data.
    # Header: 8-byte length, then this JSON (175 characters) padded with one space to 176:
    header = ('{"__metadata__":{"cid":"3","num_examples":"20"},'
              '"seeds":{"dtype":"I64","shape":[200],"data_offsets":[0,1600]},'
              '"grads":{"dtype":"F32","shape":[200],"data_offsets":[1600,2400]}}')
    assert len(header) == 175
    payload = {SEEDS: torch.zeros(200, dtype=torch.int64), GRADS: torch.zeros(200, dtype=torch.float32)}
    encoded = CodecChain([]).encode(payload, {"cid": "3", "num_examples": "20"}, CodecContext("up", 1, 3, payload))
    assert encoded.nbytes == 8 + 176 + 2400 == 2584
    # The size does not depend on the model: full-parameter SmolLM2-135M sends the same
    # 12 B per step, so 18 KB (18,432 B) allows (18432 - 184) / 12 = 1520 steps per round.


def fedkseed_raw(tmp_path, rounds=2):
    raw = tiny_config(tmp_path, rounds=rounds)
    raw["peft"] = {"method": "full"}
    raw["learner"] = {"name": "fedkseed", "num_seeds": K, "steps": STEPS, "lr": 1e-3, "eps": 1e-3, "cache": True}
    raw["server_steps"] = [{"name": "non_state_payload"}]
    return raw


def test_config_refuses_fedkseed_without_its_step(tmp_path):
    raw = fedkseed_raw(tmp_path)
    raw["server_steps"] = []
    raw["server_optimizer"] = {"name": "fedadam"}
    with pytest.raises(ConfigError) as err:
        from fedfm.components import validate_components

        validate_components(from_dict(raw))
    assert "non_state_payload" in str(err.value) and "sgd with lr 1.0" in str(err.value)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(tmp_path_factory, "fedkseed", fedkseed_raw)


def test_server_model_is_the_replay_of_its_checkpointed_history(run):
    rt, out = run
    ss = rt.loop.server_state
    history = ss["fedkseed.history"]["coef"]
    assert tuple(history.shape) == (2, K) and bool((history != 0).any())
    pool = seed_pool(0, K)
    rebuilt = replay(rt.wb.initial_state(), history, pool)
    assert all(torch.equal(rebuilt[k], ss[MODEL][k]) for k in ss[MODEL])
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    saved = load_file(str(ckpt / "algorithm.safetensors"))
    assert torch.equal(saved["fedkseed.history/coef"], history)
    # every client-round uplink is the two tensors plus metadata: well under 18 KB
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows[1:]:
        assert r["bytes_up"] / len(r["clients"]) < 1024


def pad8(n: int) -> int:
    return n + (-n) % 8


def test_downlink_and_phase_bytes_by_hand(run):
    # No State travels down. Per client-round (K = 16 seeds, 2 clients, both every round):
    #   fedkseed_known   down: empty payload "{}" padded to 8          -> 8 + 8 = 16 B
    #                    up:   rows int64 (1,)                         -> 8 + 64 + 8 = 80 B
    #   fedkseed_history down: the unseen rows' nonzero entries, index int32 + coef float32
    #                          (8 B each): round 1 none, round 2 the nnz of round 1's row
    #                          (at most 2 clients x 3 steps = 6)      -> 8 + header + 8 * nnz
    #                    up:   empty                                   -> 16 B
    #   train broadcast: no tensors, metadata {"round": "r"}           -> 8 + 32 = 40 B
    #   (the cached model holds the round's start, so a client taking part every round is sent one row)
    rt, out = run
    history = rt.loop.server_state["fedkseed.history"]["coef"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    known_up = '{"rows":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}'
    assert 8 + pad8(len(known_up)) + 8 == 80
    for r in rows[1:]:
        n = r["round"] - 1
        nnz = int((history[:n] != 0).sum())
        assert nnz <= 6 * n
        # since 0 in both rounds: the cache of round 1 holds the model before any row
        head = ('{"__metadata__":{"rows":"%d","since":"0"},"coef":{"dtype":"F32","shape":[%d],"data_offsets":[0,%d]},'
                '"index":{"dtype":"I32","shape":[%d],"data_offsets":[%d,%d]}}' % (n, nnz, 4 * nnz, nnz, 4 * nnz, 8 * nnz))
        history_down = 8 + pad8(len(head)) + 8 * nnz
        assert len(r["clients"]) == 2
        assert r["phase_bytes"]["fedkseed_known"] == {"down": 2 * 16, "up": 2 * 80}
        assert r["phase_bytes"]["fedkseed_history"] == {"down": 2 * history_down, "up": 2 * 16}
        assert len('{"__metadata__":{"round":"1"}}') == 30  # padded to 32
        assert r["bytes_down"] == 2 * (16 + history_down + 40)
        # up: the two phases' replies plus the update (2 x 12 B a step plus its header, see above)
        update_up = r["bytes_up"] - 2 * (80 + 16)
        assert 2 * (8 + 12 * STEPS) < update_up < 2 * 1024


def test_fresh_client_rebuilds_the_server_model_from_the_history(run, tmp_path):
    rt, _ = run
    ss = rt.loop.server_state
    history = ss["fedkseed.history"]["coef"]
    params = build_learner(rt.exp.learner).params
    store = ClientStore(tmp_path / "store")  # a new process: nothing cached
    store.stage(1, "r3a0")
    env = SimpleNamespace(store=store, wb=rt.wb, algo=rt.loop.algo)
    assert KnownRows(params).client(env, 1, 3, {}, {})[1]["rows"].tolist() == [0]
    HistoryRows(params).client(env, 1, 3, *sparse_rows(history, 0))
    rebuilt = store.get(1, "fedkseed_model")
    assert all(torch.equal(rebuilt[k], ss[MODEL][k]) for k in ss[MODEL])
    # from its last known round: the cached model after round 1, sent only round 2's row
    store2 = ClientStore(tmp_path / "store2")
    store2.put(1, "fedkseed_model", replay(rt.wb.initial_state(), history[:1], seed_pool(0, K)))
    store2.put(1, "fedkseed_round", {"round": torch.tensor([2]), "rows": torch.tensor([1])})
    store2.stage(1, "r3a0")
    env2 = SimpleNamespace(store=store2, wb=rt.wb, algo=rt.loop.algo)
    assert KnownRows(params).client(env2, 1, 3, {}, {})[1]["rows"].tolist() == [1]
    HistoryRows(params).client(env2, 1, 3, *sparse_rows(history[1:], 1))
    again = store2.get(1, "fedkseed_model")
    assert all(torch.equal(again[k], ss[MODEL][k]) for k in ss[MODEL])
    with pytest.raises(ValueError, match="its cache holds 2 rows"):
        HistoryRows(params).client(env2, 1, 3, *sparse_rows(history[1:], 1))
    # the round-3 instruction carries no State: the learner trains from the rebuilt model
    learner = build_learner(rt.exp.learner)
    ctx = rt.wb.context(1, 3, store=store)
    update = learner.local_update(Instruction(round=3, cid=1, state={}), ctx)
    assert update.payload[SEEDS].dtype == torch.int64 and update.payload[SEEDS].shape == (STEPS,)
    assert update.metrics["forward_passes"] == 2 * STEPS
    with pytest.raises(ValueError, match="no model rebuilt for round 4"):
        learner.local_update(Instruction(round=4, cid=1, state={}), rt.wb.context(1, 4, store=store))


def test_round_delta_is_the_weighted_sum_of_directions():
    # D(c) = c0 z(pool0) + c2 z(pool2) for c = (0.5, 0, -2): check against the two directions
    pool = seed_pool(0, 3)
    shapes = {"a": torch.zeros(4), "b": torch.zeros(2, 2)}
    d = round_delta(torch.tensor([0.5, 0.0, -2.0]), pool, shapes)
    from fedfm.aggregators.zo_replay import param_noise

    for i, n in enumerate(sorted(shapes)):
        expected = 0.5 * param_noise(shapes[n].shape, pool[0], i) - 2.0 * param_noise(shapes[n].shape, pool[2], i)
        assert torch.allclose(d[n], expected, atol=1e-6)


def test_resume_is_bit_identical(tmp_path):
    # 2 rounds straight vs 1 round then --resume to 2: same history, same model
    def raw(rounds):
        r = fedkseed_raw(tmp_path, rounds=rounds)
        r["peft"] = {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["query"]}
        r["learner"]["steps"] = 2
        return r

    from fedfm.runtime.workbench import Workbench

    wb = Workbench(from_dict(raw(2)))  # one model for the three runs (rounds do not change it)
    straight = LocalRuntime(from_dict(raw(2)), tmp_path / "a", workbench=wb)
    straight.run()
    LocalRuntime(from_dict(raw(1)), tmp_path / "b", workbench=wb).run()
    resumed = LocalRuntime(from_dict(raw(2)), tmp_path / "b", resume=True, workbench=wb)
    resumed.run()
    a, b = straight.loop.server_state, resumed.loop.server_state
    assert a["fedkseed.history"]["coef"].shape[0] == 2
    assert torch.equal(a["fedkseed.history"]["coef"], b["fedkseed.history"]["coef"])
    assert all(torch.equal(a[MODEL][k], b[MODEL][k]) for k in a[MODEL])


def test_rebuild_runs_in_the_model_tensors_and_the_store_reads_back_in_place(run, tmp_path):
    # the phase replays into the client model's own parameters (no second State copy) and the
    # store copies the stored tensors back into given tensors one at a time
    rt, _ = run
    ss = rt.loop.server_state
    params = build_learner(rt.exp.learner).params
    store = ClientStore(tmp_path / "store")
    store.stage(1, "r3a0")
    env = SimpleNamespace(store=store, wb=rt.wb, algo=rt.loop.algo)
    model_params = {n: p for n, p in rt.wb.model.named_parameters() if p.requires_grad}
    before = {n: p.data.data_ptr() for n, p in model_params.items()}
    HistoryRows(params).client(env, 1, 3, *sparse_rows(ss["fedkseed.history"]["coef"], 0))
    assert all(model_params[n].data.data_ptr() == before[n] for n in before)
    assert all(torch.equal(model_params[n].data, ss[MODEL][n]) for n in ss[MODEL])
    target = {k: torch.zeros_like(v) for k, v in ss[MODEL].items()}
    ptrs = {k: v.data_ptr() for k, v in target.items()}
    assert store.read_into(1, "fedkseed_model", target)
    assert all(torch.equal(target[k], ss[MODEL][k]) and target[k].data_ptr() == ptrs[k] for k in target)
    assert not store.read_into(1, "nothing_here", target)
    with pytest.raises(KeyError, match="lacks"):
        store.read_into(1, "fedkseed_model", {**target, "extra": torch.zeros(1)})
