"""``sim_clock``: the simulated duration of each round, from the clients' capacities.

A server step at stage ``updates`` (``runtime/capacity.py`` has the pure clock). For each
update it takes the client's local steps (metric ``steps``), the per-step cost
(``seconds_per_step``, or, when unset, the client's own measured ``step_s`` metric), the
client's ``speed`` and bandwidths from its profile, and the bytes each way: up, the
payload's tensor bytes as decoded; down, the client's ``bytes_down`` metric (the tensor
bytes of the instruction it received, reported by the heterogeneous learners), else the
same as up. A learner whose link carries more than its payload (split learning: the
activations and their gradients at every step; its server-side half never travels)
reports ``wire_bytes_up`` / ``wire_bytes_down``, which replace both; SplitFed also reports
``server_s``, the main server's seconds for that client, added to its compute time
unscaled (the client waits for the server at every step; the server is not the phone);
``server_seconds_per_step`` replaces the measured seconds by that many per client step, so
that with ``seconds_per_step`` too the clock, and which clients miss a deadline, no longer
depend on the machine. These are raw
tensor bytes before the codec chains (split learning: the activation chains' encoded
bytes): the round loop's encoded counts (``bytes_up``/``bytes_down``) are not visible to a server step.

With ``deadline_s``, updates later than the deadline are dropped before aggregation and
counted in ``late``. Metrics (``sim_clock.<key>``): ``sim_time_s`` (this round),
``sim_total_s`` (since round 1; kept in the step's checkpointed state), ``late``,
``bytes_up.<role>`` / ``bytes_down.<role>`` (per tier) and ``compute_s_max`` /
``comm_s_max``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.types import State, Update
from fedfm.runtime.capacity import ClientTiming, client_seconds, resolve_link, round_clock


class SimClockParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds_per_step: float | None = Field(
        None, gt=0, description="cost of one local step on a speed-1.0 device; unset: each client's measured step_s"
    )
    deadline_s: float | None = Field(None, gt=0, description="drop updates whose simulated time exceeds this")
    server_seconds_per_step: float | None = Field(
        None, gt=0, description="split learning: the main server's seconds per client step; unset: its measured server_s"
    )


def payload_bytes(payload: State) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


def timing_of(update: Update, profile: dict, seconds_per_step: float | None,
              server_seconds_per_step: float | None = None) -> ClientTiming:
    who = f"client {update.cid}"
    if "steps" not in update.metrics:
        raise ValueError(f"sim_clock: {who} reported no 'steps' metric")
    step_s = seconds_per_step if seconds_per_step is not None else update.metrics.get("step_s")
    if step_s is None:
        raise ValueError(f"sim_clock: {who} reported no measured 'step_s'; set sim_clock's seconds_per_step")
    speed, up, down = resolve_link(profile, who)
    m = update.metrics
    up_bytes = int(m.get("wire_bytes_up", payload_bytes(update.payload)))
    down_bytes = int(m.get("wire_bytes_down", m.get("bytes_down", up_bytes)))
    server_s = float(m.get("server_s", 0.0))  # split learning: the main server's seconds for this client
    if "server_s" in m and server_seconds_per_step is not None:  # given: the clock no longer depends on the machine
        server_s = server_seconds_per_step * int(m["steps"])
    return ClientTiming(update.cid, int(update.metrics["steps"]), float(step_s), down_bytes, up_bytes, speed, down, up, server_s)


class SimClock:
    name = "sim_clock"
    stage = "updates"
    client_state = None  # every client gets the global State

    def __init__(self, params: SimClockParams):
        self.seconds_per_step, self.deadline_s = params.seconds_per_step, params.deadline_s
        self.server_seconds_per_step = params.server_seconds_per_step

    def __call__(self, updates: list[Update], ctx, state: State):
        profiles = {c.cid: c.profile for c in ctx.clients} if ctx is not None else {}
        timings = [timing_of(u, profiles.get(u.cid, {}), self.seconds_per_step, self.server_seconds_per_step)
                   for u in updates]
        sim, late = round_clock(timings, self.deadline_s)
        total = float(state["total"].item()) + sim if "total" in state else sim
        metrics: dict = {"sim_time_s": sim, "sim_total_s": total, "late": len(late)}
        parts = [client_seconds(t) for t in timings]
        if parts:
            metrics["compute_s_max"] = max(p["compute"] for p in parts)
            metrics["comm_s_max"] = max(p["comm"] for p in parts)
        for t in timings:
            role = str(profiles.get(t.cid, {}).get("role", "default"))
            metrics[f"bytes_up.{role}"] = metrics.get(f"bytes_up.{role}", 0) + t.bytes_up
            metrics[f"bytes_down.{role}"] = metrics.get(f"bytes_down.{role}", 0) + t.bytes_down
        kept = [u for u in updates if u.cid not in set(late)]
        return kept, {"total": torch.tensor([total], dtype=torch.float64)}, metrics


register_server_step("sim_clock", SimClock, SimClockParams)

__all__ = ["SimClock", "SimClockParams", "payload_bytes", "timing_of"]
