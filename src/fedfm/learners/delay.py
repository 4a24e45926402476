"""``delay``: a client that takes real wall time before training, as a slow device would.

Simulated stragglers (``faults.stragglers``) cost no wall time; this middleware does, so
that what depends on real time can be exercised: a transport's round timeout
(``runtime.flower.round_timeout_s``), or a run killed while a round is in flight and then
resumed. ``rounds`` limits it to some rounds (all by default).

    federation:
      roles: [{name: slow, cids: [2], middleware: [{name: delay, seconds: 30, rounds: [2]}]}]
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from fedfm.learners.middleware import PassThrough, register_middleware


class DelayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(..., ge=0, description="wall seconds to wait before training")
    rounds: list[int] | None = Field(None, description="the rounds it waits in (default: every round)")


class Delay(PassThrough):
    name = "delay"

    def __init__(self, params: DelayParams):
        self.seconds, self.rounds = params.seconds, params.rounds

    def before_train(self, examples, ctx):
        if self.rounds is None or ctx.round in self.rounds:
            time.sleep(self.seconds)
        return examples


register_middleware("delay", Delay, DelayParams)
