"""Capacity profiles and the simulated round clock, by hand."""

from __future__ import annotations

import pytest
import torch

from fedfm.aggregators.sim_clock import SimClock, SimClockParams
from fedfm.core.protocols import RoundContext
from fedfm.core.types import ClientSpec, Update
from fedfm.runtime.capacity import ClientTiming, client_seconds, resolve_capacity, round_clock


def test_profile_resolves_rank_layers_cut_and_link():
    cap = resolve_capacity({"rank": 2, "layers": 1, "speed": 0.25, "bandwidth_mbps": 5}, full_rank=8, full_layers=6)
    assert (cap.rank, cap.layers, cap.cut, cap.speed, cap.up_mbps, cap.down_mbps) == (2, 1, 6, 0.25, 5.0, 5.0)
    # capacity 0.5 derives what is not given: rank round(0.5*8)=4, layers round(0.5*6)=3, cut 3
    cap = resolve_capacity({"capacity": 0.5, "up_mbps": 1, "down_mbps": 10}, 8, 6)
    assert (cap.rank, cap.layers, cap.cut, cap.speed, cap.up_mbps, cap.down_mbps) == (4, 3, 3, 1.0, 1.0, 10.0)
    full = resolve_capacity({}, 8, 6)
    assert (full.rank, full.layers, full.cut, full.up_mbps) == (8, 6, 6, None)


def test_profile_errors_name_the_key_and_client():
    with pytest.raises(ValueError, match=r"client 3: profile.rank = 16 exceeds the model's 8"):
        resolve_capacity({"rank": 16}, 8, 6, "client 3")
    with pytest.raises(ValueError, match=r"profile.speed must be a positive number"):
        resolve_capacity({"speed": 0}, 8, 6)
    with pytest.raises(ValueError, match=r"profile.capacity must be in \(0, 1\]"):
        resolve_capacity({"capacity": 1.5}, 8, 6)


def hand_profile():
    # phone: 10 steps * 0.5 s / speed 0.25 = 20 s compute;
    #        8 * 1e6 B / 8e6 bit/s = 1 s down, 8 * 5e5 / 8e6 = 0.5 s up -> 21.5 s
    # server: 10 * 0.5 / 1 = 5 s; 8e6 / 1e8 = 0.08 s down, 4e6 / 1e8 = 0.04 s up -> 5.12 s
    phone = ClientTiming(0, steps=10, seconds_per_step=0.5, bytes_down=1_000_000, bytes_up=500_000, speed=0.25, down_mbps=8, up_mbps=8)
    server = ClientTiming(1, steps=10, seconds_per_step=0.5, bytes_down=1_000_000, bytes_up=500_000, speed=1.0, down_mbps=100, up_mbps=100)
    return phone, server


def test_sim_time_by_hand():
    phone, server = hand_profile()
    assert client_seconds(phone) == pytest.approx({"compute": 20.0, "comm": 1.5, "total": 21.5})
    assert client_seconds(server) == pytest.approx({"compute": 5.0, "comm": 0.12, "total": 5.12})
    assert round_clock([phone, server]) == (pytest.approx(21.5), [])  # the slowest client
    assert round_clock([phone, server], deadline_s=10.0) == (10.0, [0])  # phone late: ends at the deadline
    assert round_clock([phone, server], deadline_s=30.0) == (pytest.approx(21.5), [])
    assert round_clock([]) == (0.0, [])
    # split learning: the server's 3 s for the phone are added unscaled: 20 + 3 + 1.5 = 24.5 s
    from dataclasses import replace

    assert client_seconds(replace(phone, server_s=3.0)) == pytest.approx({"compute": 23.0, "comm": 1.5, "total": 24.5})


def test_sim_clock_step_reports_and_drops_late_updates():
    # payload: 125,000 float32 = 500,000 B up; bytes_down reported 1,000,000 B; as hand_profile
    clients = [
        ClientSpec(0, [], {"role": "phone", "speed": 0.25, "bandwidth_mbps": 8}),
        ClientSpec(1, [], {"role": "server", "speed": 1.0, "bandwidth_mbps": 100}),
    ]
    ups = [Update(c.cid, {"w": torch.zeros(125_000)}, 10, {"steps": 10.0, "bytes_down": 1e6}) for c in clients]
    ctx = RoundContext(1, 0, torch.Generator(), 2, clients)
    step = SimClock(SimClockParams(seconds_per_step=0.5))
    kept, state, m = step(ups, ctx, {})
    assert [u.cid for u in kept] == [0, 1]
    assert m["sim_time_s"] == pytest.approx(21.5) and m["sim_total_s"] == pytest.approx(21.5)
    assert m["bytes_up.phone"] == 500_000 and m["bytes_down.phone"] == 1_000_000
    assert m["compute_s_max"] == pytest.approx(20.0) and m["comm_s_max"] == pytest.approx(1.5)
    _, state, m = step(ups, ctx, state)  # the total accumulates in the step's state
    assert m["sim_total_s"] == pytest.approx(43.0)
    late = SimClock(SimClockParams(seconds_per_step=0.5, deadline_s=10.0))
    kept, _, m = late(ups, ctx, {})
    assert [u.cid for u in kept] == [1] and m["late"] == 1 and m["sim_time_s"] == 10.0


def test_sim_clock_uses_measured_step_cost_or_says_what_is_missing():
    clients = [ClientSpec(0, [], {"role": "a"})]
    ctx = RoundContext(1, 0, torch.Generator(), 1, clients)
    u = Update(0, {"w": torch.zeros(1)}, 1, {"steps": 4.0, "step_s": 0.25})
    _, _, m = SimClock(SimClockParams())([u], ctx, {})
    assert m["sim_time_s"] == pytest.approx(1.0)  # 4 * 0.25 / 1, no bandwidth: comm free
    with pytest.raises(ValueError, match="client 0 reported no measured 'step_s'"):
        SimClock(SimClockParams())([Update(0, {"w": torch.zeros(1)}, 1, {"steps": 4.0})], ctx, {})


def test_sim_time_s_in_metrics_jsonl_for_a_hand_built_profile(tmp_path):
    """Two rounds of plain LoRA on the tiny model, two tiers; ``sim_clock.sim_time_s`` in
    each metrics.jsonl row is the hand number."""
    import json

    from fedfm.config import from_dict
    from fedfm.runtime import LocalRuntime

    from conftest import tiny_config

    roles = [
        {"name": "phone", "count": 1, "profile": {"speed": 0.25, "bandwidth_mbps": 1}},
        {"name": "server", "count": 1, "profile": {"speed": 1.0, "bandwidth_mbps": 100}},
    ]
    raw = tiny_config(tmp_path, rounds=2, **{"federation.roles": roles, "train.steps": 3,
                                              "server_steps": [{"name": "sim_clock", "seconds_per_step": 0.5}]})
    rt = LocalRuntime(from_dict(raw), tmp_path / "run")
    # The payload, both ways: LoRA r=4 on query+value of 2 layers at hidden 32:
    # 4 modules * (4*32 + 32*4) = 1,024 floats; the head 2*32 + 2 = 66 floats (the
    # pooler is frozen); 1,090 floats = 4,360 bytes.
    assert sum(t.numel() for t in rt.wb.template.values()) == 1090
    # phone: 3 steps * 0.5 s / 0.25 = 6 s; 2 * 8 * 4,360 bit / 1e6 bit/s = 0.06976 s -> 6.06976 s
    # server: 1.5 s + 2 * 8 * 4,360 / 1e8 = 1.5006976 s; the round lasts as long as the phone
    rt.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sim_clock.sim_time_s"] for r in rows[1:]] == [pytest.approx(6.06976)] * 2
    assert rows[2]["sim_clock.sim_total_s"] == pytest.approx(2 * 6.06976)
    assert rows[1]["sim_clock.compute_s_max"] == pytest.approx(6.0) and rows[1]["sim_clock.comm_s_max"] == pytest.approx(0.06976)
    assert rows[1]["sim_clock.bytes_up.phone"] == rows[1]["sim_clock.bytes_down.server"] == 4360
