"""What happened in one round, over all its attempts: the clients sampled, dropped, failed
and rejected, the bytes each way (per codec stage and per exchange phase) and what the
exchange phases reported; the round loop turns it into the round's row of metrics.jsonl."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundLog:
    """What happened to the sampled clients of one round, over all its attempts."""

    sampled: list[int] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    attempts: int = 0
    up_stages: dict[str, int] = field(default_factory=dict)
    phase_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    phase_metrics: dict[str, Any] = field(default_factory=dict)  # "<phase>.<key>" (ExchangePhase.metrics)

    def phase_report(self, phase, round_state: dict) -> None:
        if phase.metrics is not None:
            self.phase_metrics.update({f"{phase.name}.{k}": v for k, v in phase.metrics(round_state).items()})

    def note(self, kind: str, cid: int, attempt: int, **info: Any) -> None:
        entry = {"cid": cid, **info}
        if attempt:
            entry["attempt"] = attempt
        getattr(self, kind).append(entry)

    def add_stages(self, info: dict[str, float]) -> None:
        stages = {k[len("stage."):]: int(v) for k, v in info.items() if k.startswith("stage.")}
        for k, v in stages.items():
            self.up_stages[k] = self.up_stages.get(k, 0) + v
        if stages:
            self.up_stages["payloads"] = self.up_stages.get("payloads", 0) + 1
