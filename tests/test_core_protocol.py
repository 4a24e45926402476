"""The protocol core's parts with hand-checkable numbers: the median rule, the
clip_updates server step, client roles, shared/local state and per-client evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedfm.aggregators.clip import ClipParams, ClipUpdates, l2_norm
from fedfm.aggregators.median import coordinate_median
from fedfm.config import ConfigError, from_dict
from fedfm.core.protocols import RoundContext
from fedfm.core.types import Update
from fedfm.runtime import LocalRuntime
from fedfm.runtime.roles import assign_roles
from fedfm.runtime.store import ClientStore

from conftest import tiny_config


def ctx(n=4):
    return RoundContext(round=1, seed=0, generator=torch.Generator().manual_seed(0), num_clients=n)


def test_coordinate_median_by_hand():
    state = {"w": torch.zeros(3)}
    deltas = [{"w": torch.tensor(v)} for v in ([1.0, -5.0, 0.0], [2.0, 7.0, 0.0], [100.0, 1.0, 3.0])]
    # Odd n: the middle value per coordinate; the weights (examples) are ignored.
    got = coordinate_median(state, deltas, [1, 1, 1000])["w"]
    assert torch.equal(got, torch.tensor([2.0, 1.0, 0.0]))
    # Even n: the mean of the two middle values ([1, 2, 100, 4] -> (2 + 4) / 2 = 3).
    deltas.append({"w": torch.tensor([4.0, -1.0, 1.0])})
    assert torch.equal(coordinate_median(state, deltas, [1] * 4)["w"], torch.tensor([3.0, 0.0, 0.5]))


def test_clip_updates_step_by_hand():
    step = ClipUpdates(ClipParams(max_norm=5.0))
    ups = [Update(0, {"a": torch.tensor([3.0, 4.0])}, 1), Update(1, {"a": torch.tensor([6.0, 0.0]), "b": torch.tensor([8.0])}, 1)]
    out, state, metrics = step(ups, ctx(), {})
    assert torch.equal(out[0].payload["a"], torch.tensor([3.0, 4.0]))  # norm 5: unchanged
    # norm sqrt(36 + 64) = 10 -> scaled by 1/2 over the whole payload
    assert torch.equal(out[1].payload["a"], torch.tensor([3.0, 0.0])) and torch.equal(out[1].payload["b"], torch.tensor([4.0]))
    assert metrics == {"clipped": 1, "mean_norm": 7.5} and state == {}
    assert math.isclose(l2_norm(out[1].payload), 5.0)
    assert torch.equal(ups[1].payload["a"], torch.tensor([6.0, 0.0]))  # the input is not modified


def test_roles_are_seeded_disjoint_and_refused_when_too_many(tmp_path):
    raw = tiny_config(tmp_path, **{"federation.clients": 10})
    raw["federation"]["roles"] = [
        {"name": "pinned", "cids": [3]},
        {"name": "attacker", "fraction": 0.2},
        {"name": "phone", "count": 3, "profile": {"rank": 2}},
    ]
    exp = from_dict(raw)
    a = assign_roles(exp.federation.roles, 10, exp.seed)
    assert a == assign_roles(exp.federation.roles, 10, exp.seed)  # the same in every process
    counts = {r: list(a.values()).count(r) for r in set(a.values())}
    assert counts == {"pinned": 1, "attacker": 2, "phone": 3, "default": 4} and a[3] == "pinned"
    raw["federation"]["roles"][2]["count"] = 8
    with pytest.raises(ConfigError, match=r"roles need 11 clients .* federation.clients is 10"):
        from_dict(raw)
    raw["federation"]["roles"] = [{"name": "x", "fraction": 0.5, "count": 2}]
    with pytest.raises(ConfigError, match="exactly one of fraction, count, cids"):
        from_dict(raw)


def test_local_state_never_leaves_the_client_and_clients_evaluate(tmp_path):
    raw = tiny_config(tmp_path, rounds=2, **{"federation.client_holdout": 0.25, "eval.clients": "all"})
    raw["peft"]["local"] = ["*classifier*"]
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    full = rt.wb.initial_state()
    head = {k for k in full if "classifier" in k}
    assert head and rt.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shared_numel = sum(v.numel() for k, v in full.items() if k not in head)
    for r in rows[1:]:
        assert 0.0 <= r["client_accuracy_worst10"] <= r["client_accuracy_mean"] <= 1.0
        assert 0.0 <= r["client_balanced_accuracy_worst10"] <= r["client_balanced_accuracy_mean"] <= 1.0
        assert r["client_evaluated"] == 2 and 0.0 <= r["balanced_accuracy"] <= 1.0
        # Every uplink payload holds the shared float32 values only (plus its header).
        assert r["codec_bytes"]["up"]["input"] > shared_numel * 4 * len(r["clients"])
        assert r["codec_bytes"]["up"]["input"] < (shared_numel * 4 + 4096) * len(r["clients"])
    final = rt.final_state
    assert set(final) == set(full) - head  # the server never held the heads
    store = ClientStore(tmp_path / "run" / "clients")
    for cid in (0, 1):  # each client's head is its own, trained, and settled on its next message
        store.settle(cid, rt.loop.outcomes[cid][0], rt.loop.outcomes[cid][1])
        mine = store.get(cid, "local_state")
        assert set(mine) == head and any(not torch.equal(mine[k], full[k]) for k in head)
    a, b = store.get(0, "local_state"), store.get(1, "local_state")
    assert any(not torch.equal(a[k], b[k]) for k in head)


def test_client_eval_needs_a_holdout(tmp_path):
    with pytest.raises(ConfigError, match="client_holdout"):
        from_dict(tiny_config(tmp_path, **{"eval.clients": "all"}))
