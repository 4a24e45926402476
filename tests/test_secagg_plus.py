"""SecAgg+ (exchanges: [{name: secagg, neighbours: k}]): the Harary graph by hand, the same
unmasked sum as SecAgg to the last bit with fewer share bytes counted by hand, dropouts
after and before masking recovered from the neighbours alone, a round whose masked inputs
fall apart in the graph refused, and bad settings named."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.config import ConfigError, from_dict
from fedfm.privacy.secagg import graph
from fedfm.privacy.secagg.params import SecAggParams, dropout_stages
from fedfm.runtime import LocalRuntime

from conftest import tiny_config

IDS = [0, 1, 2, 3, 4, 5]


def test_the_harary_graph_by_hand():
    ring = graph.ring_order(IDS, b"roster")
    assert sorted(ring) == IDS
    ring2 = graph.neighbours(IDS, b"roster", 2)
    assert all(ring2[ring[i]] == {ring[i - 1], ring[(i + 1) % 6]} for i in range(6))  # a cycle in ring order
    ring4 = graph.neighbours(IDS, b"roster", 4)
    assert all(ring4[ring[i]] == {ring[i - 2], ring[i - 1], ring[(i + 1) % 6], ring[(i + 2) % 6]} for i in range(6))
    assert graph.neighbours(IDS, b"roster", 6) == graph.neighbours(IDS, b"roster", None) == {u: set(IDS) - {u} for u in IDS}
    assert graph.ring_order(IDS, b"another roster") != ring  # the order follows the public seed
    assert graph.graph_seed(1, 0, [2, 0]) == bytes([0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])  # round, attempt, sorted ids
    cycle = {u: {(u - 1) % 6, (u + 1) % 6} for u in IDS}  # 0-1-2-3-4-5-0
    assert graph.connected(cycle, [0, 2, 3, 4, 5])  # one client out: a path
    assert graph.connected(cycle, [0, 3, 4, 5]) and not graph.connected(cycle, [0, 2, 3, 5])  # 1, 2 out vs 1, 4 out
    assert graph.holders(6, 2) == 3 and graph.holders(6, None) == 6 and graph.holders(3, 4) == 3
    # the outlook's floor: t = max(2, 3 - 1) of the 3 holders, not of the 6 clients
    assert {s.floor for s in dropout_stages(SecAggParams(bound=1.0, neighbours=2), 6)} == {2}
    assert {s.floor for s in dropout_stages(SecAggParams(bound=1.0), 6)} == {4}


def config(tmp_path, secagg: dict | None = None, rounds: int = 1, **over):
    raw = tiny_config(tmp_path, rounds=rounds, **{"federation.clients": 6, "train.steps": 2, "train.epochs": 1, **over})
    if secagg is not None:
        raw["exchanges"] = [{"name": "secagg", "bound": 16.0, "frac_bits": 16, **secagg}]
    return raw


def run(raw, out):
    rt = LocalRuntime(from_dict(raw), out)
    rt.run()
    return rt.final_state, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secagg_full")
    return {"tmp": tmp, "runs": {}}


def full_run(full, drop):
    key = json.dumps(drop)
    if key not in full["runs"]:
        full["runs"][key] = run(config(full["tmp"], {"drop": drop}), full["tmp"] / f"full{len(full['runs'])}")
    return full["runs"][key]


def test_secagg_plus_unmasks_the_same_sum_with_fewer_share_bytes(full):
    plain_final, plain_rows = full_run(full, [])
    final, rows = run(config(full["tmp"], {"neighbours": 2}), full["tmp"] / "plus")
    assert same(final, plain_final)  # the same integers summed modulo 2^24: bit for bit
    row, ref = rows[1], plain_rows[1]
    assert row["clients"] == IDS and row["failed"] == []
    u8 = lambda *shape: torch.zeros(shape, dtype=torch.uint8)  # noqa: E731
    nbytes = lambda tensors, meta: len(to_bytes(Payload(tensors, meta)))  # noqa: E731
    # each client: 2 boxes of shares (id 4 + nonce 12 + 148 + tag 16 = 180 B) instead of 5,
    # and it holds 3 shares to send at unmasking (its own and its 2 neighbours') instead of 6
    assert row["phase_bytes"]["secagg_share"]["up"] == 6 * nbytes({"commit": u8(32), "boxes": u8(2, 180)}, {})
    assert ref["phase_bytes"]["secagg_share"]["up"] == 6 * nbytes({"commit": u8(32), "boxes": u8(5, 180)}, {})
    assert row["phase_bytes"]["secagg_route"]["down"] == 6 * nbytes({"inbox": u8(2, 180)}, {"attempt": "0", "u2": "0,1,2,3,4,5"})
    assert row["phase_bytes"]["secagg_unmask"]["up"] == 6 * nbytes({"shares": u8(3, 75)}, {"refused": ""})
    # down: the 6 ids (4 B each) and the keys of itself and its 2 neighbours (68 B each), not
    # all 6 clients' keys; the threshold is of the 3 holders: t = max(2, 3 - 1) = 2
    assert row["phase_bytes"]["secagg_share"]["down"] == 6 * nbytes({"ids": u8(24), "roster": u8(3, 68)},
                                                                    {"attempt": "0", "threshold": "2"})
    assert ref["phase_bytes"]["secagg_share"]["down"] == 6 * nbytes({"roster": u8(6, 68)}, {"attempt": "0", "threshold": "4"})
    assert row["phase_bytes"]["secagg_advertise"] == ref["phase_bytes"]["secagg_advertise"]


@pytest.mark.parametrize("phase", ["unmask", "train"])
def test_a_dropout_is_recovered_from_the_neighbours_alone(full, phase):
    drop = [{"phase": phase, "cids": [1]}]
    plain_final, plain_rows = full_run(full, drop)
    final, rows = run(config(full["tmp"], {"neighbours": 2, "drop": drop}), full["tmp"] / f"plus_{phase}")
    assert same(final, plain_final)  # after masking: in the sum; before: left out, its masks removed
    assert rows[1]["clients"] == plain_rows[1]["clients"] == ([0, 2, 3, 4, 5] if phase == "train" else IDS)
    assert [(e["cid"], e["phase"]) for e in rows[1]["failed"] if e.get("phase")] == (
        [(1, "secagg_unmask")] if phase == "unmask" else [])


def test_masked_inputs_cut_apart_in_the_graph_fail_the_round(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(graph, "ring_order", lambda ids, roster: sorted(ids))  # the ring 0-1-2-3-4-5-0
    raw = config(tmp_path, {"neighbours": 2, "drop": [{"phase": "train", "cids": [1, 4], "rounds": [1]}]}, rounds=2,
                 **{"federation.on_too_few": "skip"})
    with caplog.at_level(logging.WARNING, logger="fedfm.privacy.secagg"):
        _, rows = run(raw, tmp_path / "run")
    reason = "the masked inputs of 0,2,3,5 are not connected in the neighbour graph: unmasking would reveal the sum of each part"
    assert rows[1]["skipped"] and rows[1]["clients"] == [] and reason in caplog.text
    assert rows[1]["secagg_unmask.failed"] == reason
    assert rows[2]["clients"] == IDS and not rows[2]["skipped"]  # the next round runs
    # 1 and 2 out leave the path 3-4-5-0, but dropped client 1's mask key is held by 0 and 2
    # only: one share, fewer than t = 2 (a neighbourhood below t, the other way SecAgg+ fails)
    raw = config(tmp_path, {"neighbours": 2, "drop": [{"phase": "train", "cids": [1, 2], "rounds": [1]}]}, rounds=1,
                 **{"federation.on_too_few": "skip", "federation.max_retries": 0})
    _, rows = run(raw, tmp_path / "run2")
    assert rows[1]["secagg_unmask.failed"] == "secagg: 1 shares of dropped client 1's mask key, fewer than the threshold 2"
    # k = 4 (links +-1, +-2), t = 3: with 1 and 4 out, 0-2-3-5 stay linked (0-2, 2-3, 3-5, 5-0) and
    # every secret keeps 3 holders (client 0's: itself, 2 and 5; client 1's key: 5, 0, 2 and 3)
    raw = config(tmp_path, {"neighbours": 4, "threshold": 3, "drop": [{"phase": "train", "cids": [1, 4]}]})
    _, rows = run(raw, tmp_path / "run3")
    assert rows[1]["clients"] == [0, 2, 3, 5] and not rows[1]["skipped"]


@pytest.mark.parametrize("secagg,message", [
    ({"neighbours": 3}, "neighbours 3 is odd: the Harary graph links each client to k/2 on either side of a ring"),
    ({"neighbours": 2, "threshold": 4}, "threshold 4 exceeds the 3 holders of each client's shares (itself and its neighbours 2)"),
])
def test_bad_neighbour_settings_are_named(tmp_path, secagg, message):
    with pytest.raises(ConfigError) as info:
        from_dict(config(tmp_path, secagg))
    assert message in str(info.value)


def test_a_client_refuses_to_unmask_survivors_cut_apart(tmp_path, monkeypatch):
    """A server that asks anyway (here: the test in its place) gets no shares."""
    import types

    from test_secagg_units import Round, updates_of

    from fedfm.privacy.secagg.mask import mask_update

    monkeypatch.setattr(graph, "ring_order", lambda ids, roster: sorted(ids))  # the ring 0-1-2-3-0
    r = Round(tmp_path, {"bound": 4.0, "frac_bits": 8, "neighbours": 2}, n=4)
    going = r.phase("route", r.phase("share", r.phase("advertise", r.cids)))
    updates = updates_of({c: [0.5, 0.25] for c in going}, {c: 1 for c in going})
    for cid in going:
        mask_update(updates[cid], types.SimpleNamespace(cid=cid, round=r.rnd, store=r.store))
    unmask = r.phases["unmask"]
    with pytest.raises(ValueError, match=r"client 0: the survivors \[0, 2\] are not connected in the neighbour graph"):
        unmask.client(r.env, 0, r.rnd, {"attempt": "0", "survivors": "0,2", "dropped": "1,3"}, {})
    meta, tensors = unmask.client(r.env, 0, r.rnd, {"attempt": "0", "survivors": "0,1", "dropped": "2,3"}, {})
    assert tensors["shares"].shape == (3, 75)  # b shares of itself and 1, s share of 3 (2 is no neighbour: none held)
