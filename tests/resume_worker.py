"""Runs a tiny experiment in its own process for tests/test_resume.py.

    python tests/resume_worker.py CONFIG.json OUT [--resume]

Registers the ``counting`` learner: plain local training whose payload also depends on
a per-client counter kept in the client store (read, incremented, written back each
round), so a store write leaking out of an interrupted round changes the final State.
With FEDFM_PAUSE_ROUND=r it writes OUT/paused right after the staged store write of the
first client of round r and sleeps, so that the test can SIGKILL it mid-round.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from fedfm.learners import learners
from fedfm.learners.base import register_learner
from fedfm.learners.local import LocalLearner


class CountingLearner(LocalLearner):
    def local_update(self, instruction, ctx):
        prev = ctx.store.get(ctx.cid, "count")
        n = 0.0 if prev is None else float(prev["n"])
        ctx.store.put(ctx.cid, "count", {"n": torch.tensor(n + 1.0)})
        pause = os.environ.get("FEDFM_PAUSE_ROUND")
        out = os.environ.get("FEDFM_PAUSE_DIR")
        if pause is not None and int(pause) == instruction.round and out:
            Path(out, "paused").write_text(str(ctx.cid))
            time.sleep(600)
        update = super().local_update(instruction, ctx)
        update.payload = {k: v + 1e-3 * n for k, v in update.payload.items()}
        return update


def register() -> None:
    if "counting" not in learners.names():
        register_learner("counting", CountingLearner)


register()

if __name__ == "__main__":
    from fedfm.config import from_dict
    from fedfm.runtime import run_local

    raw = json.loads(Path(sys.argv[1]).read_text())
    run_local(from_dict(raw), sys.argv[2], progress=False, resume="--resume" in sys.argv)
