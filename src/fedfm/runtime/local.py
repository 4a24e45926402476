"""The local in-process backend: the round loop over ONE base model.

Per round: sample clients, configure, and for each client decode its broadcast (the
downlink codec chain), train (``local_update``), encode the delta (the uplink chain);
the server decodes the bytes, aggregates, and evaluates on the held-out test set.
Bytes on the wire are the ``len()`` of what the chains produced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfm.codecs import CodecChain, CodecContext
from fedfm.core.types import State, Update
from fedfm.runtime.algorithm import Algorithm
from fedfm.runtime.outputs import RunWriter, peak_rss_mb
from fedfm.runtime.progress import RunProgress
from fedfm.runtime.seeding import derive_seed
from fedfm.runtime.store import ClientStore
from fedfm.runtime.workbench import Workbench


def sample_clients(exp, clients, rnd: int):
    k = exp.federation.clients_per_round
    if k is None or k >= len(clients):
        return list(clients)
    rng = np.random.default_rng(derive_seed(exp.seed, rnd, 0x5A))
    chosen = np.sort(rng.choice(len(clients), size=k, replace=False))
    return [clients[i] for i in chosen]


class LocalRuntime:
    def __init__(self, exp, out: str | Path, progress: bool | None = None, workbench: Workbench | None = None):
        self.exp = exp
        self.out = Path(out)
        self.progress_enabled = exp.runtime.progress if progress is None else progress
        if exp.runtime.threads:
            torch.set_num_threads(exp.runtime.threads)
        self.wb = workbench or Workbench(exp)
        self.algo = Algorithm(exp)
        self.up = CodecChain.from_specs(exp.codecs.up, "codecs.up")
        self.down = CodecChain.from_specs(exp.codecs.down, "codecs.down")
        self.store = ClientStore(self.out / "clients")

    def _client_round(self, rnd: int, inst, state: State, prog: RunProgress) -> tuple[Update, int, int]:
        cid = inst.cid
        down_ctx = CodecContext("down", rnd, cid, state, seed=self.exp.seed, store=self.store)
        sent = self.down.encode(inst.state, {"round": str(rnd)}, down_ctx)
        inst.state, _ = self.down.decode(sent.data, down_ctx)
        ctx = self.wb.context(cid, rnd, on_step=prog.step, store=self.store)
        update = self.algo.local_update(inst, ctx)
        up_ctx = CodecContext("up", rnd, cid, self.algo.payload_reference(state), seed=self.exp.seed, store=self.store)
        meta = {"cid": str(cid), "num_examples": str(update.num_examples)}
        encoded = self.up.encode(update.payload, meta, up_ctx)
        payload, meta = self.up.decode(encoded.data, up_ctx)
        received = Update(cid=int(meta["cid"]), payload=payload, num_examples=int(meta["num_examples"]), metrics=update.metrics)
        return received, encoded.nbytes, sent.nbytes

    def run(self) -> dict[str, Any]:
        exp, wb = self.exp, self.wb
        t_start = time.perf_counter()
        writer = RunWriter(self.out, exp)
        state = wb.initial_state()
        t0 = time.perf_counter()
        first = wb.evaluate(state)
        writer.log_round({"round": 0, **first, "bytes_up": 0, "bytes_down": 0, "clients": [], "wall_s": time.perf_counter() - t0})
        totals = {"bytes_up": 0, "bytes_down": 0}
        with RunProgress(exp.rounds, self.progress_enabled) as prog:
            for rnd in range(1, exp.rounds + 1):
                t0 = time.perf_counter()
                sampled = sample_clients(exp, wb.clients, rnd)
                prog.start_round(rnd, len(sampled))
                updates, up, down = [], 0, 0
                for inst in self.algo.configure(rnd, state, sampled):
                    prog.start_client(inst.cid)
                    update, nb_up, nb_down = self._client_round(rnd, inst, state, prog)
                    updates.append(update)
                    up, down = up + nb_up, down + nb_down
                    prog.end_client()
                state = self.algo.aggregate(state, updates)
                row: dict[str, Any] = {"round": rnd}
                if rnd % exp.eval.every == 0 or rnd == exp.rounds:
                    row.update(wb.evaluate(state))
                train_loss = [u.metrics.get("train_loss") for u in updates if "train_loss" in u.metrics]
                row.update(
                    {
                        "train_loss": float(np.mean(train_loss)) if train_loss else None,
                        "bytes_up": up,
                        "bytes_down": down,
                        "clients": [u.cid for u in updates],
                        "wall_s": time.perf_counter() - t0,
                    }
                )
                totals["bytes_up"] += up
                totals["bytes_down"] += down
                writer.log_round(row)
                prog.end_round(rnd, row)
        last = writer.rows[-1]
        summary = {
            "name": exp.name,
            "rounds": exp.rounds,
            "final": {k: last.get(k) for k in ("accuracy", "loss") if k in last},
            "initial": {k: first.get(k) for k in ("accuracy", "loss") if k in first},
            "total_bytes_up": totals["bytes_up"],
            "total_bytes_down": totals["bytes_down"],
            "wall_s": time.perf_counter() - t_start,
            "peak_rss_mb": peak_rss_mb(),
            "fingerprint": wb.fingerprint,
        }
        writer.finish(state, summary)
        self.final_state = state
        # Optional end-of-run task hook (causal LM: greedy generations -> generations.jsonl).
        if hasattr(wb.task, "finish"):
            wb.task.finish(wb.model, wb.tokenizer, self.out, wb.federation.frame.iloc[wb.federation.test_indices])
        return summary


def run_local(exp, out: str | Path, progress: bool | None = None) -> dict[str, Any]:
    return LocalRuntime(exp, out, progress).run()
