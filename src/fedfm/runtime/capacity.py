"""Client capacity profiles and the simulated round clock.

A client's capacity comes from its profile (``federation.roles[].profile``, copied into
``ClientSpec.profile``), so device tiers are roles::

    federation:
      roles:
        - {name: phone,  fraction: 0.34, profile: {rank: 2, layers: 2, cut: 1, speed: 0.25, bandwidth_mbps: 5}}
        - {name: laptop, fraction: 0.33, profile: {rank: 4, layers: 4, cut: 2, speed: 0.5,  bandwidth_mbps: 20}}
        - {name: server, fraction: 0.33, profile: {rank: 8, layers: 6, cut: 3, speed: 1.0,  bandwidth_mbps: 100}}

Profile keys (all optional): ``rank`` (LoRA rank), ``layers`` (trainable transformer
layers), ``cut`` (split-learning cut point: layers held by the client), ``capacity`` (a
fraction in (0, 1] from which whichever of rank/layers/cut is not given is derived:
``max(1, round(capacity * full))``), ``speed`` (compute relative to the reference device,
1.0 = the machine that measured the per-step cost), ``bandwidth_mbps`` (both directions)
or ``up_mbps``/``down_mbps``, and ``memory_mb`` (recorded; the split benchmark reports the
client's peak memory against it). A client without a key gets the full model.

The simulated clock (``client_seconds``, ``round_clock``): a client's time is

    compute = steps * seconds_per_step / speed (+ server_s, the server's own seconds for
              this client, in split learning)
    comm    = 8 * bytes_down / (down_mbps * 1e6) + 8 * bytes_up / (up_mbps * 1e6)

and a round lasts as long as its slowest sampled client, or ``deadline_s`` where one is
set: clients later than the deadline are dropped and the round ends at the deadline (or
at the slowest on-time client when none is late). The server step ``sim_clock``
(``aggregators/sim_clock.py``) applies it to each round's updates and reports
``sim_clock.sim_time_s``. Simulated, not wall, time: the outcome is deterministic given the
per-step cost, and the federation's speed mix does not depend on the machine running it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from fedfm.core.profile_keys import register_profile_key

# The keys read here (core/profile_keys.py: a key no room registers and no config field names is refused).
PROFILE_KEYS = ("rank", "layers", "cut", "capacity", "speed", "bandwidth_mbps", "up_mbps", "down_mbps", "memory_mb")


@dataclass(frozen=True)
class Capacity:
    """What one client can afford, resolved against the model's full sizes."""

    rank: int
    layers: int
    cut: int
    speed: float = 1.0
    up_mbps: float | None = None  # None: communication is free
    down_mbps: float | None = None
    memory_mb: float | None = None


def _positive(profile: dict[str, Any], key: str, who: str) -> float | None:
    value = profile.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:  # NaN and inf too
        raise ValueError(f"{who}: profile.{key} must be a positive number, got {value!r}")
    return float(value)


def client_who(cid: int, profile: dict[str, Any]) -> str:
    """How errors name a client: ``client 3 (role 'phone')`` (the role the runtime set)."""
    role = profile.get("role")
    return f"client {cid}" if role is None else f"client {cid} (role '{role}')"


SIZE_KEYS = ("rank", "layers", "cut")
POSITIVE_KEYS = ("capacity", "speed", "bandwidth_mbps", "up_mbps", "down_mbps", "memory_mb")


def profile_problems(profile: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with a profile's values without the model (config time): ``rank``,
    ``layers`` and ``cut`` integers >= 1, ``capacity`` in (0, 1], the others positive; the
    sizes against the model are checked where it is known (``resolve_size``)."""
    problems = []
    for key in SIZE_KEYS:
        value = profile.get(key)
        if key not in skip and value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{where}: profile.{key} must be an integer >= 1, got {value!r}")
    for key in POSITIVE_KEYS:
        try:
            value = _positive(profile, key, where)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if key == "capacity" and value is not None and value > 1:
            problems.append(f"{where}: profile.capacity must be in (0, 1], got {value:g}")
    return problems


def resolve_capacity(profile: dict[str, Any], full_rank: int, full_layers: int, who: str = "client") -> Capacity:
    """The capacity of a client with ``profile`` on a model of LoRA rank ``full_rank`` and
    ``full_layers`` transformer layers; bad or too-large values name the key and the client."""
    speed, up, down = resolve_link(profile, who)
    return Capacity(
        rank=resolve_size(profile, "rank", full_rank, who),
        layers=resolve_size(profile, "layers", full_layers, who),
        cut=resolve_size(profile, "cut", full_layers, who),
        speed=speed,
        up_mbps=up,
        down_mbps=down,
        memory_mb=_positive(profile, "memory_mb", who),
    )


def resolve_size(profile: dict[str, Any], key: str, full: int, who: str = "client") -> int:
    """``profile[key]`` (an integer in 1..full), else ``max(1, round(capacity * full))``,
    else ``full``."""
    frac = _positive(profile, "capacity", who)
    if frac is not None and frac > 1:
        raise ValueError(f"{who}: profile.capacity must be in (0, 1], got {frac}")
    value = profile.get(key)
    if value is None:
        return full if frac is None else max(1, round(frac * full))
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{who}: profile.{key} must be an integer >= 1, got {value!r}")
    if value > full:
        raise ValueError(f"{who}: profile.{key} = {value} exceeds the model's {full}")
    return value


def resolve_link(profile: dict[str, Any], who: str = "client") -> tuple[float, float | None, float | None]:
    """(speed, up_mbps, down_mbps) of a profile; ``bandwidth_mbps`` sets both directions."""
    both = _positive(profile, "bandwidth_mbps", who)
    up = _positive(profile, "up_mbps", who) or both
    down = _positive(profile, "down_mbps", who) or both
    return _positive(profile, "speed", who) or 1.0, up, down


SIZED_BY_CAPACITY = ("hetlora", "flexlora", "fedra", "split", "splitfed", "flash")  # learners that size a client by it
CLOCK = ("server_steps=sim_clock",)
register_profile_key("rank", "LoRA rank, 1..peft.r (hetlora, flexlora)", ("learner.name=hetlora", "learner.name=flexlora"))
register_profile_key("layers", "transformer layers the client trains (fedra)", ("learner.name=fedra",))
register_profile_key("cut", "split point: layers held by the client (split, splitfed)", ("learner.name=split", "learner.name=splitfed"))
register_profile_key("capacity", "fraction in (0, 1] from which rank/layers/cut not given are derived; flash: the share of the mask",
                     tuple(f"learner.name={n}" for n in SIZED_BY_CAPACITY))
register_profile_key("speed", "compute relative to the reference device (sim_clock)", CLOCK)
register_profile_key("bandwidth_mbps", "link speed both ways, megabits per second (sim_clock)", CLOCK)
register_profile_key("up_mbps", "uplink speed, megabits per second (sim_clock)", CLOCK)
register_profile_key("down_mbps", "downlink speed, megabits per second (sim_clock)", CLOCK)
register_profile_key("memory_mb", "the device's memory, recorded (reports)")


@dataclass(frozen=True)
class ClientTiming:
    """One sampled client's round, as the clock needs it."""

    cid: int
    steps: int
    seconds_per_step: float
    bytes_down: int
    bytes_up: int
    speed: float = 1.0
    down_mbps: float | None = None
    up_mbps: float | None = None
    server_s: float = 0.0  # seconds the server computes for this client (split learning), not scaled by speed


def transfer_seconds(nbytes: int, mbps: float | None) -> float:
    """Seconds to move ``nbytes`` at ``mbps`` megabits per second (0 without a bandwidth)."""
    return 0.0 if mbps is None else 8.0 * nbytes / (mbps * 1e6)


def client_seconds(t: ClientTiming) -> dict[str, float]:
    """{"compute", "comm", "total"} simulated seconds of one client's round."""
    compute = t.steps * t.seconds_per_step / t.speed + t.server_s
    comm = transfer_seconds(t.bytes_down, t.down_mbps) + transfer_seconds(t.bytes_up, t.up_mbps)
    return {"compute": compute, "comm": comm, "total": compute + comm}


def round_clock(timings: Sequence[ClientTiming], deadline_s: float | None = None) -> tuple[float, list[int]]:
    """(simulated round time, ids of the clients that missed the deadline).

    Without a deadline the round lasts as long as its slowest client. With one, late
    clients are dropped; the round lasts until the deadline if any client was late (the
    server waited for it), else until its slowest client."""
    if not timings:
        return 0.0, []
    totals = {t.cid: client_seconds(t)["total"] for t in timings}
    if deadline_s is None:
        return max(totals.values()), []
    late = sorted(c for c, s in totals.items() if s > deadline_s)
    return (deadline_s if late else max(totals.values())), late
