"""FedBFPT's PL-SDL (``personalize/fedbfpt.py``): the halving layer schedule, the sampled
deeper layers, exact-zero deltas for what a client does not train, the config checks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Instruction
from fedfm.personalize.fedbfpt import FedBFPTLearner, FedBFPTParams, current_layer, layer_schedule, local_layers
from fedfm.runtime import LocalRuntime
from fedfm.runtime.workbench import Workbench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layer_schedule_by_hand():
    # remain = I; at round index i (0-based): if i == I - floor(remain / 2): l += 1, remain = I - i.
    # I = 10: i = 10 - 5 = 5 -> l 1, remain 5; i = 10 - 2 = 8 -> l 2, remain 2; i = 10 - 1 = 9 -> l 3, remain 1;
    # then 10 - 0 = 10 is never reached.  (The journal version: "[0, 0, 0, 0, 0, 1, 1, 1, ...]".)
    assert layer_schedule(10) == [0, 0, 0, 0, 0, 1, 1, 1, 2, 3]
    # I = 5: i = 5 - 2 = 3 -> l 1, remain 2; i = 5 - 1 = 4 -> l 2.
    assert layer_schedule(5) == [0, 0, 0, 1, 2]
    assert layer_schedule(3) == [0, 0, 1] and layer_schedule(2) == [0, 1] and layer_schedule(1) == [0]
    # I = 20: 0 x 10 (i < 10), 1 x 5 (i = 10..14), 2 x 3 (i = 15..17), 3 (i = 18), 4 (i = 19).
    assert layer_schedule(20) == [0] * 10 + [1] * 5 + [2] * 3 + [3, 4]
    # l stays below L_k: with L_k = 3, I = 10 rounds 9 and 10 (l 2, 3) train layer 2; rounds past I keep the last.
    assert [current_layer(r, 10, 3) for r in range(1, 11)] == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert current_layer(12, 10, 6) == 3 and current_layer(1, 10, 1) == 0


def test_local_model_layers():
    gen = torch.Generator().manual_seed(0)
    # Forced draws: one deeper layer to choose from (L = 2) or none.
    assert local_layers(0, 2, 2, gen) == [0, 1]  # l 0, L_k 2: one draw from {1}
    assert local_layers(1, 2, 2, gen) == [0, 1]  # l 1: no deeper layer
    assert local_layers(0, 1, 2, gen) == [0]  # L_k 1: the trained layer alone
    # BERT-base as in the paper: L 12, L_k 6, round 9 of 10 (l 2): layers 0, 1, 2 then 3 draws from 3..11.
    keep = local_layers(2, 6, 12, torch.Generator().manual_seed(7))
    assert len(keep) == 6 and keep[:3] == [0, 1, 2] and keep[3:] == sorted(keep[3:]) and all(3 <= i <= 11 for i in keep[3:])
    # The same seed, the same draws (every process agrees).
    assert keep == local_layers(2, 6, 12, torch.Generator().manual_seed(7))


def test_deeper_layers_are_drawn_uniformly_with_replacement():
    # l 0, L 12, L_k 6: 5 draws from the 11 layers 1..11. Uniform: each layer 5/11 = 0.4545 draws per
    # round. With replacement, all 5 differ with probability 11*10*9*8*7 / 11^5 = 55440 / 161051 = 0.3442
    # (without replacement it would be 1).
    n = 4000
    counts, distinct = Counter(), 0
    for seed in range(n):
        deeper = local_layers(0, 6, 12, torch.Generator().manual_seed(seed))[1:]
        counts.update(deeper)
        distinct += len(set(deeper)) == 5
    assert sorted(counts) == list(range(1, 12))
    assert all(abs(counts[i] / n - 5 / 11) < 0.04 for i in counts), counts
    assert abs(distinct / n - 0.3442) < 0.03, distinct / n


def _wb(tmp_path, layers: int, local: int, rounds: int = 2):
    raw = tiny_config(tmp_path, **{"model.task": "masked_lm", "model.num_labels": None, "rounds": rounds, "train.steps": 2,
                                   "model.config_overrides.num_hidden_layers": layers})
    raw["peft"] = {"method": "full"}
    raw["learner"] = {"name": "fedbfpt", "rounds": rounds, "local_layers": local}
    wb = Workbench(from_dict(raw))
    return wb, FedBFPTLearner(FedBFPTParams(rounds=rounds, local_layers=local))


def _moved(payload, part: str) -> list[bool]:
    return [bool(payload[k].any()) for k in payload if part in k]


def test_untrained_parameters_get_exactly_zero_delta(tmp_path):
    wb, learner = _wb(tmp_path, layers=2, local=2)
    start = wb.initial_state()
    # Round 1 of I = 2: l 0, local model [0, 1] (layer 1 drawn from {1}): layer 0 and the MLM head train;
    # layer 1 runs but is frozen, the embeddings are frozen: exactly zero.
    up = learner.local_update(Instruction(round=1, cid=0, state=start), wb.context(0, 1))
    assert up.metrics["layer"] == 0 and up.metrics["local_layers"] == 2
    assert all(_moved(up.payload, ".layer.0.")) and not any(_moved(up.payload, ".layer.1."))
    assert not any(_moved(up.payload, "embeddings")) and any(_moved(up.payload, "cls."))
    assert set(up.payload) == set(start)  # the whole State, zeros included
    assert len(wb.model.bert.encoder.layer) == 2 and all(p.requires_grad for p in wb.model.parameters())  # restored
    # Round 2: l 1: layer 1 and the head train; layer 0 (trained in stage 0, synchronised) is frozen now.
    up = learner.local_update(Instruction(round=2, cid=0, state=start), wb.context(0, 2))
    assert up.metrics["layer"] == 1
    assert all(_moved(up.payload, ".layer.1.")) and not any(_moved(up.payload, ".layer.0."))
    assert not any(_moved(up.payload, "embeddings")) and any(_moved(up.payload, "cls."))


def test_forward_runs_exactly_the_local_model(tmp_path):
    # L 4, L_k 3, round 1 (l 0): the local model is [0, a, b], a <= b drawn from {1, 2, 3}; each layer
    # runs once per appearance per step (2 steps); the others do not run at all.
    wb, learner = _wb(tmp_path, layers=4, local=3)
    ctx = wb.context(0, 1)
    _, keep = learner.plan(1, 4, torch.Generator().manual_seed(ctx.seed))
    calls = Counter()
    hooks = [m.register_forward_hook(lambda *_, i=i: calls.update([i])) for i, m in enumerate(wb.model.bert.encoder.layer)]
    try:
        up = learner.local_update(Instruction(round=1, cid=0, state=wb.initial_state()), ctx)
    finally:
        for h in hooks:
            h.remove()
    assert keep[0] == 0 and len(keep) == 3
    assert dict(calls) == {i: 2 * keep.count(i) for i in set(keep)}, (keep, calls)
    for i in range(1, 4):  # drawn or not, the deeper layers are not trained
        assert not any(_moved(up.payload, f".layer.{i}."))


def test_run_aggregates_only_the_trained_layer_and_head(tmp_path):
    raw = tiny_config(tmp_path, **{"model.task": "masked_lm", "model.num_labels": None, "rounds": 2, "train.steps": 1,
                                   "server.keep_checkpoints": 3})
    raw["peft"] = {"method": "full"}
    raw["learner"] = {"name": "fedbfpt", "rounds": 2, "local_layers": 2}
    raw["codecs"] = {"up": [{"skip_zero": True}], "down": [{"delta": True}, {"skip_zero": True}]}
    out = tmp_path / "run"
    LocalRuntime(from_dict(raw), out).run()
    from safetensors.torch import load_file

    s0, s1, s2 = (load_file(str(out / "checkpoints" / f"round-00000{r}" / "state.safetensors")) for r in (0, 1, 2))
    changed = lambda a, b, part: [not torch.equal(a[k], b[k]) for k in a if part in k]  # noqa: E731
    assert all(changed(s0, s1, ".layer.0.")) and not any(changed(s0, s1, ".layer.1.")) and not any(changed(s0, s1, "embeddings"))
    assert all(changed(s1, s2, ".layer.1.")) and not any(changed(s1, s2, ".layer.0.")) and not any(changed(s1, s2, "embeddings"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    full = sum(t.numel() * 4 for t in s0.values()) * 2  # both clients' whole State, float32
    assert 0 < rows[1]["bytes_up"] < full / 2 and 0 < rows[2]["bytes_down"] < full / 2, (rows[1]["bytes_up"], full)


def test_config_checks(tmp_path):
    raw = tiny_config(tmp_path, **{"model.task": "masked_lm", "model.num_labels": None, "rounds": 3})
    raw["peft"] = {"method": "full"}
    raw["learner"] = {"name": "fedbfpt", "rounds": 2}
    with pytest.raises(ConfigError, match="learner fedbfpt: rounds 2 differs from the run's rounds 3"):
        from_dict(raw)
    raw["learner"] = {"name": "fedbfpt"}
    with pytest.raises(ConfigError, match="learner.rounds: Field required"):
        from_dict(raw)
    raw["learner"] = {"name": "fedbfpt", "rounds": 3}
    raw["peft"] = {"method": "lora", "r": 2, "target_modules": ["query"]}
    with pytest.raises(ConfigError, match="use peft.method full"):
        from_dict(raw)
    learner = FedBFPTLearner(FedBFPTParams(rounds=3, local_layers=5))
    with pytest.raises(ValueError, match="local_layers 5 exceeds the model's 2 transformer layers"):
        learner.plan(1, 2, torch.Generator())
    assert FedBFPTLearner(FedBFPTParams(rounds=3)).plan(1, 12, torch.Generator().manual_seed(0))[1][:1] == [0]
    assert len(FedBFPTLearner(FedBFPTParams(rounds=3)).plan(1, 12, torch.Generator().manual_seed(0))[1]) == 6  # L_k = 12 // 2
