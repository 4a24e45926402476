"""The local backend: the round loop (runtime/loop.py) over the in-process transport,
with ONE base model in memory for the server's evaluation and every client's training.

Client state (SCAFFOLD's c_i, error-feedback residuals, what each client last received,
local parameters) lives in the disk-backed client store under ``DIR/clients``, exactly as
it would on the data owners' machines.

``runtime.transport`` picks the transport: ``sequential`` (runtime/transport.py, one
client at a time), ``processes`` (runtime/concurrent.py, several clients at once in
worker processes forked after the model is loaded) or ``batched`` (runtime/batched.py,
several clients' LoRA in one forward pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedfm.runtime.algorithm import build_algorithm
from fedfm.runtime.batched import BatchedTransport
from fedfm.runtime.client import ClientEnv
from fedfm.runtime.concurrent import ProcessTransport
from fedfm.runtime.loop import ResumeError, RoundLoop
from fedfm.runtime.progress import RunProgress
from fedfm.runtime.sampling import sample_clients
from fedfm.runtime.store import ClientStore
from fedfm.runtime.transport import InProcessTransport
from fedfm.runtime.workbench import Workbench

__all__ = ["LocalRuntime", "ResumeError", "run_local", "sample_clients"]


class LocalRuntime:
    def __init__(self, exp, out: str | Path, progress: bool | None = None, workbench: Workbench | None = None,
                 resume: bool = False, overwrite: bool = False):
        if exp.runtime.threads:
            torch.set_num_threads(exp.runtime.threads)
        self.exp, self.out = exp, Path(out)
        self.wb = workbench or Workbench(exp)
        enabled = exp.runtime.progress if progress is None else progress
        self.prog = RunProgress(exp.rounds, enabled)
        self.env = ClientEnv.build(exp, self.wb, build_algorithm(exp), ClientStore(self.out / "clients"))
        self.env.on_step = self.prog.step
        rt = exp.runtime
        if rt.transport == "batched":
            self.transport = BatchedTransport(self.env, rt.batch_clients, rt.batch_kernel,
                                              on_start=self.prog.start_client, on_end=self.prog.end_client)
        elif rt.transport == "processes":
            self.transport = ProcessTransport(self.env, rt.workers, rt.threads_per_worker,
                                              on_start=self.prog.start_client, on_end=self.prog.end_client,
                                              parent_trains=rt.parent_trains)
        else:
            self.transport = InProcessTransport(self.env, on_start=self.prog.start_client, on_end=self.prog.end_client)
        self.loop = RoundLoop(exp, self.out, self.transport, self.wb, resume=resume, overwrite=overwrite,
                              progress=self.prog, backend="local")
        self.store = self.env.store
        self.algo = self.env.algo  # the in-process clients' side of the algorithm

    @property
    def final_state(self):
        return self.loop.final_state

    def run(self) -> dict[str, Any]:
        try:
            return self.loop.run()
        finally:
            self.transport.close()  # worker processes, if any


def run_local(exp, out: str | Path, progress: bool | None = None, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    return LocalRuntime(exp, out, progress, resume=resume, overwrite=overwrite).run()
