"""A robust rule over a group's holders (aggregators/holders.py): a layer, density level or
domain held by fewer clients than the rule combines stays where it is, and the round's row
says so, instead of a run stopped by the rule or a plain mean behind the rule's back."""

from __future__ import annotations

import json

import torch
from conftest import tiny_config

from fedfm.aggregators import aggregators
from fedfm.aggregators.fedra import allocation, per_layer_delta
from fedfm.aggregators.holders import HELD_BACK, combine_holders
from fedfm.aggregators.nested_masks import level_masks, nested_combine
from fedfm.config import from_dict
from fedfm.core.types import Update
from fedfm.runtime.local import LocalRuntime

T = torch.tensor
KRUM = aggregators.get("krum").obj
KRUM_F1 = aggregators.parse("krum", {"f": 1}, "aggregator")
L0, L1, HEAD = "m.layer.0.q.lora_A.default.weight", "m.layer.1.q.lora_A.default.weight", "classifier.weight"


def test_combine_holders_by_hand():
    model = {"w": T([0.0])}
    notes: dict = {}
    # 4 holders, Krum f = 1 (n - f - 2 = 1 neighbour): 0 -> 1 (1), 1 -> 1.5 (0.25), 1.5 -> 1 (0.25),
    # 10 -> 1.5 (72.25); the tie between 1 and 1.5 goes to the lower index: 1
    four = [{"w": T([v])} for v in (0.0, 1.0, 1.5, 10.0)]
    assert combine_holders(KRUM, KRUM_F1, model, four, [1.0] * 4, "layer 0", notes)["w"].tolist() == [1.0]
    assert notes == {}
    # 3 holders: Krum needs f + 3 = 4; the group stays and is noted
    assert combine_holders(KRUM, KRUM_F1, model, four[:3], [1.0] * 3, "layer 1", notes)["w"].tolist() == [0.0]
    assert notes == {HELD_BACK: {"layer 1": "3 holder(s), the rule combines at least 4"}}
    # no holder: stays, nothing to note
    assert combine_holders(KRUM, KRUM_F1, model, [], [], "layer 2", notes)["w"].tolist() == [0.0]
    assert list(notes[HELD_BACK]) == ["layer 1"]


def test_fedra_layers_with_too_few_trainers_stay_under_krum():
    # layer 0 and the head: all 4 clients, Krum picks client 1 (layer 0: 0, 1, 1.5, 10 as above;
    # head: 1, 2, 3, 100, scores 1, 1, 1, 97^2 -> client 0 for the head group, a group of its own)
    model = {L0: T([0.0]), L1: T([0.0]), HEAD: T([0.0])}
    pays = [{L0: T([a]), HEAD: T([h])} for a, h in ((0.0, 1.0), (1.0, 2.0), (1.5, 3.0), (10.0, 100.0))]
    pays[2][L1], pays[3][L1] = T([5.0]), T([7.0])  # layer 1: clients 2 and 3 only
    notes: dict = {}
    delta, counts = per_layer_delta(model, pays, [1.0] * 4, KRUM, KRUM_F1, notes)
    assert delta[L0].tolist() == [1.0] and delta[HEAD].tolist() == [1.0] and delta[L1].tolist() == [0.0]
    assert counts == {"0": 4, "1": 2, "rest": 4}
    assert notes == {HELD_BACK: {"layer 1": "2 holder(s), the rule combines at least 4"}}


def test_hetero_flash_level_with_too_few_holders_stays_under_krum():
    model = {"w": T([[4.0, 3.0, 1.0, 0.0]]), "classifier.weight": T([0.0])}
    server = {"w": T([[True, True, True, False]])}
    levels = {0.5: level_masks(model, server, 0.5), 1.0: server}  # 0.5: entries 0 and 1
    # level 0.5 holds all 5 (Krum, 2 neighbours): clients 0 and 3 sent the same [1, 1] (scores 0.01),
    # the lower index wins: entries 0, 1 and the head take client 0's values
    rows = [([1.0, 1.0, 0.0, 0.0], 2.0), ([1.0, 1.1, 0.0, 0.0], 2.0), ([1.1, 1.0, 5.0, 0.0], 2.0),
            ([1.0, 1.0, 5.0, 0.0], 2.0), ([9.0, 9.0, 5.0, 0.0], 2.0)]
    ups = [Update(i, {"w": T([w]), "classifier.weight": T([h])}, 1) for i, (w, h) in enumerate(rows)]
    notes: dict = {}
    delta = nested_combine(model, ups, [0.5, 0.5, 1.0, 1.0, 1.0], levels.__getitem__, KRUM, KRUM_F1, notes)
    # level 1 (entry 2) is held by clients 2, 3, 4 only: fewer than Krum's 4, entry 2 stays
    assert delta["w"].tolist() == [[1.0, 1.0, 0.0, 0.0]] and delta["classifier.weight"].tolist() == [2.0]
    assert notes == {HELD_BACK: {"level 1": "3 holder(s), the rule combines at least 4"}}


def test_a_fedra_run_under_krum_reports_the_layers_it_held_back(tmp_path):
    """5 clients each train 1 of the tiny model's 2 layers (seed 0, round 1: the allocation
    below); a layer fewer than 4 clients trained stays, and the row names it."""
    raw = tiny_config(tmp_path, rounds=1, **{
        "federation.clients": 5, "federation.partitioner": {"name": "iid"},
        "federation.roles": [{"name": "one", "count": 5, "profile": {"layers": 1}}],
        "aggregator": {"rule": "krum", "f": 1}, "learner": {"name": "fedra"}, "train.steps": 1,
        "runtime": {"progress": False, "threads": 1}})
    out = tmp_path / "run"
    LocalRuntime(from_dict(raw, "<test>"), out).run()
    row = [json.loads(line) for line in open(out / "metrics.jsonl")][1]
    assert [allocation(0, 1, cid, 1, 2)[0] for cid in range(5)] == [0, 0, 1, 1, 1]
    assert row[HELD_BACK] == {"layer 0": "2 holder(s), the rule combines at least 4",
                              "layer 1": "3 holder(s), the rule combines at least 4"}
    assert row["skipped"] is None and sorted(row["clients"]) == [0, 1, 2, 3, 4]
