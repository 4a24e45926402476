"""Secure aggregation in real rounds (exchanges: secagg) on the
local backend with the tiny model: the result equals plain FedAvg up to the bounded
quantization, every phase's bytes match a hand count, dropouts after and before masking
are recovered, too many dropouts fail the round and the next one runs, distributed DP
composes, and combinations that need individual updates are refused at config time."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from fedfm.aggregators import register_server_step, server_steps
from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.config import ConfigError, from_dict
from fedfm.runtime import LocalRuntime

from conftest import tiny_config

RECORDED: dict[int, tuple[dict, int]] = {}  # cid -> (plain update payload, num_examples)
BOUND, FRAC = 16.0, 16


class Recorder:
    """A test-only step (stage updates) that keeps each plain update for the hand computations."""

    name, stage, client_state = "record_updates", "updates", None

    def __call__(self, value, ctx, state):
        for u in value:
            RECORDED[u.cid] = ({k: v.clone() for k, v in u.payload.items()}, u.num_examples)
        return value, state, {}


if "record_updates" not in server_steps.names():
    register_server_step("record_updates", lambda params: Recorder())


def config(tmp_path, secagg: dict | None = None, rounds: int = 1, **over):
    raw = tiny_config(tmp_path, rounds=rounds, **{"federation.clients": 3, "train.steps": 2, "train.epochs": 1, **over})
    if secagg is not None:
        raw["exchanges"] = [{"name": "secagg", "bound": BOUND, "frac_bits": FRAC, **secagg}]
    return raw


def run(raw, out):
    rt = LocalRuntime(from_dict(raw), out)
    rt.run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rt.final_state, rows


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    RECORDED.clear()
    raw = config(tmp)
    raw["server_steps"] = [{"name": "record_updates"}]
    final, rows = run(raw, tmp / "run")
    updates = dict(RECORDED)
    mean_all = fedavg(updates, [0, 1, 2])
    initial = {k: final[k].double() - mean_all[k] for k in final}
    return {"final": final, "rows": rows, "updates": updates, "initial": initial, "tmp": tmp}


def fedavg(updates, cids):
    w = sum(updates[c][1] for c in cids)
    return {k: sum(updates[c][1] * updates[c][0][k].double() for c in cids) / w for k in updates[cids[0]][0]}


def max_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_secagg_equals_fedavg_up_to_quantization_and_phase_bytes_by_hand(plain):
    final, rows = run(config(plain["tmp"], {}), plain["tmp"] / "secagg")
    n = {c: plain["updates"][c][1] for c in range(3)}
    W = sum(n.values())
    # Each client's n_i * x_i is rounded to a multiple of 2^-16 (error <= 2^-17); the
    # mean's error is at most 3 * 2^-17 / W; float32 storage adds at most ~1e-7.
    bound = 3 * 2.0**-17 / W + 2e-7
    assert max(abs(float(x) * n[c]) for c in range(3) for x in torch.cat([v.reshape(-1) for v in plain["updates"][c][0].values()])) < BOUND
    assert max_diff(final, plain["final"]) <= bound
    row = rows[1]
    assert row["clients"] == [0, 1, 2] and row["failed"] == [] and row["rejected"] == []

    def nbytes(tensors, meta):
        return len(to_bytes(Payload(tensors, meta)))

    u8 = lambda *shape: torch.zeros(shape, dtype=torch.uint8)  # noqa: E731
    # Raw content per client: advertise up c_pk + s_pk = 64 B; share down the roster 3 x
    # (id 4 + 32 + 32) = 204 B, up SHA-256(b) 32 B + 2 boxes x (id 4 + nonce 12 + 148 + tag 16)
    # = 392 B; route down 2 boxes = 360 B; unmask up 3 shares x (id 4 + kind 1 + x 4 + y 66)
    # = 225 B. Each message is one safetensors payload (its header counted too).
    expected = {
        "secagg_advertise": {"down": 3 * nbytes({}, {"attempt": "0"}), "up": 3 * nbytes({"c_pk": u8(32), "s_pk": u8(32)}, {})},
        "secagg_share": {"down": 3 * nbytes({"roster": u8(3, 68)}, {"attempt": "0", "threshold": "2"}),
                         "up": 3 * nbytes({"commit": u8(32), "boxes": u8(2, 180)}, {})},
        "secagg_route": {"down": 3 * nbytes({"inbox": u8(2, 180)}, {"attempt": "0", "u2": "0,1,2"}), "up": 3 * nbytes({}, {})},
        "secagg_unmask": {"down": 3 * nbytes({}, {"attempt": "0", "survivors": "0,1,2", "dropped": ""}),
                          "up": 3 * nbytes({"shares": u8(3, 75)}, {"refused": ""})},
    }
    assert row["phase_bytes"] == expected
    body = lambda data: len(data) - 8 - int.from_bytes(data[:8], "little")  # noqa: E731  (minus the safetensors header)
    contents = {"advertise up": ({"c_pk": u8(32), "s_pk": u8(32)}, 64), "share down": ({"roster": u8(3, 68)}, 204),
                "share up": ({"commit": u8(32), "boxes": u8(2, 180)}, 392), "route down": ({"inbox": u8(2, 180)}, 360),
                "unmask up": ({"shares": u8(3, 75)}, 225)}
    for what, (tensors, raw) in contents.items():
        assert body(to_bytes(Payload(tensors, {}))) == raw, what
    # The train reply carries the masked words as float32: the plain update's bytes plus
    # the meta entry secagg_weight (and num_examples "1" instead of the count).
    phases_up = sum(v["up"] for v in expected.values())
    assert abs((row["bytes_up"] - phases_up) - plain["rows"][1]["bytes_up"]) < 3 * 40


def test_a_client_dropped_after_masking_stays_in_the_sum(plain):
    final, rows = run(config(plain["tmp"], {"drop": [{"phase": "unmask", "cids": [1]}]}), plain["tmp"] / "unmask")
    W = sum(plain["updates"][c][1] for c in range(3))
    assert max_diff(final, plain["final"]) <= 3 * 2.0**-17 / W + 2e-7
    row = rows[1]
    assert row["clients"] == [0, 1, 2]
    assert [(e["cid"], e["phase"]) for e in row["failed"]] == [(1, "secagg_unmask")]


def test_a_client_dropped_before_its_masked_input_is_left_out_exactly(plain):
    final, rows = run(config(plain["tmp"], {"drop": [{"phase": "train", "cids": [1]}]}), plain["tmp"] / "train")
    expected = {k: plain["initial"][k] + v for k, v in fedavg(plain["updates"], [0, 2]).items()}
    W = plain["updates"][0][1] + plain["updates"][2][1]
    # client 1's pairwise masks are in clients 0's and 2's inputs: its mask key is reconstructed
    assert max_diff(final, expected) <= 2 * 2.0**-17 / W + 1e-6
    assert rows[1]["clients"] == [0, 2]
    assert [e["cid"] for e in rows[1]["failed"]] == [1] and "dropped in phase train" in rows[1]["failed"][0]["error"]


def test_too_many_dropouts_fail_the_round_and_the_next_round_runs(tmp_path, caplog):
    raw = config(tmp_path, {"drop": [{"phase": "train", "cids": [0, 1], "rounds": [1]}]}, rounds=2,
                 **{"federation.on_too_few": "skip"})
    with caplog.at_level(logging.WARNING, logger="fedfm.privacy.secagg"):
        _, rows = run(raw, tmp_path / "run")
    assert rows[1]["clients"] == [] and rows[1]["skipped"] and rows[1]["loss"] == rows[0]["loss"]  # model unchanged
    assert "1 masked inputs arrived, fewer than the threshold t = 2" in caplog.text
    reasons = {k: v for k, v in rows[1].items() if k.endswith(".failed")}  # the reason is in the row too
    assert len(reasons) == 1 and "1 masked inputs arrived, fewer than the threshold t = 2" in next(iter(reasons.values()))
    assert not any(k.endswith(".failed") for k in rows[2])
    assert rows[2]["clients"] == [0, 1, 2] and rows[2]["failed"] == [] and rows[2]["loss"] != rows[0]["loss"]


def test_distributed_dp_under_secagg_equals_distributed_dp_without(plain):
    def ddp(secagg):
        raw = config(plain["tmp"], secagg, **{"federation.roles": [{"name": "all", "fraction": 1.0, "middleware": [
            {"name": "dp_client_noise", "clip_norm": 0.5, "noise_multiplier": 1.0, "clients_per_round": 3}]}]})
        raw["server_steps"] = [{"name": "dp_noise", "mode": "distributed", "noise_multiplier": 1.0, "delta": 1e-5}]
        return raw

    plain_final, plain_rows = run(ddp(None), plain["tmp"] / "ddp")
    # weight 1 (dp_client_noise), per-client noise std 1 * 0.5 / sqrt(3) = 0.29: bound 4 is 14 std
    raw = ddp({"bound": 4.0})
    final, rows = run(raw, plain["tmp"] / "ddp_secagg")
    assert max_diff(final, plain_final) <= 3 * 2.0**-17 / 3 + 2e-7
    for key in ("dp_noise.epsilon", "dp_noise.clients", "dp_noise.accounted_noise_multiplier"):
        assert rows[1][key] == plain_rows[1][key]
    assert rows[1]["dp_noise.clients"] == 3 and rows[1]["dp_noise.accounted_noise_multiplier"] == 1.0


@pytest.mark.parametrize("over,message", [
    ({"aggregator": {"rule": "median"}}, "aggregator.rule: median needs the coordinate-wise median of the individual updates"),
    ({"aggregator": {"rule": "krum", "f": 0}}, "aggregator.rule: krum needs the distances between individual updates"),
    ({"server_steps": [{"name": "clip_updates", "max_norm": 1.0}]},
     "server_steps[0] (clip_updates): runs at stage 'updates' on the individual updates"),
    ({"codecs": {"up": [{"quantize": 8}]}}, "codecs.up: ['quantize'] would change the masked integers"),
    ({"learner": {"name": "scaffold"}}, "learner.name: scaffold's server half combines individual client tensors"),
    ({"exchanges": [{"name": "secagg", "bound": 100.0, "frac_bits": 16}]},
     "3 clients x bound 100.0 x 2^16 = 1.97e+07 >= 2^23"),
    # weights: 3 clients x at most 3,000,000 examples = 9,000,000 >= 2^23 = 8,388,608
    ({"exchanges": [{"name": "secagg", "bound": 1.0, "frac_bits": 4}],
      "federation": {"clients": 3, "partitioner": {"name": "natural"}, "test_examples": 40, "examples_per_client": 3_000_000}},
     "3 clients x weight up to 3000000 = 9,000,000 >= 2^23: the summed weight would wrap (federation.examples_per_client 3000000)"),
])
def test_combinations_that_need_individual_updates_are_refused(tmp_path, over, message):
    raw = config(tmp_path, {})
    raw.update(over)
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert message in str(info.value)
