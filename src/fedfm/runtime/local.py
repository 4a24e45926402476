"""The local in-process backend: the round loop over ONE base model.

Per round: sample clients (runtime/sampling.py), decide simulated dropouts and deadline
stragglers (runtime/faults.py), and for each remaining client decode its broadcast (the
downlink codec chain), train (``local_update``; an exception is caught and logged with the
client id) and encode the payload (the uplink chain). The server checks the size, decodes
and validates every update (runtime/validate.py) and aggregates only those accepted; a
round with fewer than ``federation.min_clients`` of them is retried with a fresh sample or
skipped, never aggregated. Then it evaluates, appends the round to metrics.jsonl, writes
a checkpoint (runtime/checkpoint.py) and commits the round's client-store writes.

Every random choice derives from (seed, round, attempt, client), so a run resumed from
its last checkpoint ends bit-identical to an uninterrupted one. Bytes on the wire are the
``len()`` of what the chains produced.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfm.codecs import CodecChain, CodecContext, CodecError
from fedfm.core.types import Instruction, State, Update
from fedfm.learners.loop import planned_steps
from fedfm.runtime.algorithm import Algorithm
from fedfm.runtime.checkpoint import Checkpointer, config_digest
from fedfm.runtime.faults import judge_client
from fedfm.runtime.outputs import RunWriter, peak_rss_mb
from fedfm.runtime.progress import RunProgress
from fedfm.runtime.sampling import sample_clients
from fedfm.runtime.store import ClientStore
from fedfm.runtime.validate import check_size, check_update
from fedfm.runtime.wire import (
    broadcast_layout,
    broadcast_payload,
    broadcast_reference,
    metrics_from_meta,
    split_broadcast,
    update_meta,
)
from fedfm.runtime.workbench import Workbench

log = logging.getLogger("fedfm.runtime")


class ResumeError(ValueError):
    """A run directory that cannot be resumed with this config."""


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

    def note(self, kind: str, cid: int, attempt: int, **info: Any) -> None:
        entry = {"cid": cid, **info}
        if attempt:
            entry["attempt"] = attempt
        getattr(self, kind).append(entry)


class LocalRuntime:
    def __init__(
        self,
        exp,
        out: str | Path,
        progress: bool | None = None,
        workbench: Workbench | None = None,
        resume: bool = False,
    ):
        self.exp = exp
        self.out = Path(out)
        self.resume = resume
        self.progress_enabled = exp.runtime.progress if progress is None else progress
        if exp.runtime.threads:
            torch.set_num_threads(exp.runtime.threads)
        self.wb = workbench or Workbench(exp)
        self.algo = Algorithm(exp)
        self.up = CodecChain.from_specs(exp.codecs.up, "codecs.up")
        self.down = CodecChain.from_specs(exp.codecs.down, "codecs.down")
        self.store = ClientStore(self.out / "clients")
        self.ckpt = Checkpointer(self.out, exp.server.keep_checkpoints)

    # -- one client, client side --------------------------------------------------------

    def _broadcast(self, rnd: int, inst: Instruction, state: State, rlog: RoundLog) -> None:
        layout = broadcast_layout(inst.config)
        ref = broadcast_reference(state, layout)
        ctx = CodecContext("down", rnd, inst.cid, ref, seed=self.exp.seed, store=self.store)
        sent = self.down.encode(broadcast_payload(inst), {"round": str(rnd)}, ctx)
        rlog.bytes_down += sent.nbytes
        received, _ = self.down.decode(sent.data, ctx)
        inst.state, inst.config = split_broadcast(received, state, inst.config, layout)

    def _train(self, rnd: int, inst: Instruction, reference: State, prog: RunProgress) -> bytes:
        """The client's work: train, then encode its payload with its base-model fingerprint."""
        ctx = self.wb.context(inst.cid, rnd, on_step=prog.step, store=self.store)
        update = self.algo.local_update(inst, ctx)
        meta = update_meta(inst.cid, update, self.wb.fingerprint)
        up_ctx = CodecContext("up", rnd, inst.cid, reference, seed=self.exp.seed, store=self.store)
        return self.up.encode(update.payload, meta, up_ctx).data

    # -- one client, server side --------------------------------------------------------

    def receive(self, rnd: int, cid: int, data: bytes, reference: State) -> tuple[Update | None, str | None]:
        """Check, decode and validate one client's bytes: (update, None) or (None, reason)."""
        reason = check_size(len(data), self.exp.server.max_update_bytes)
        if reason is not None:
            return None, reason
        ctx = CodecContext("up", rnd, cid, reference, seed=self.exp.seed, store=self.store)
        try:
            payload, meta = self.up.decode(data, ctx)
        except CodecError as exc:
            return None, f"decode failed: {exc}"
        expected = self.wb.fingerprint if self.exp.server.check_fingerprint else None
        reason = check_update(payload, meta, reference, expected)
        if reason is not None:
            return None, reason
        metrics = metrics_from_meta(meta)
        return Update(cid=cid, payload=payload, num_examples=int(meta["num_examples"]), metrics=metrics, meta=meta), None

    # -- one round ----------------------------------------------------------------------

    def _attempt(self, rnd: int, attempt: int, state: State, rlog: RoundLog, prog: RunProgress) -> list[Update]:
        exp = self.exp
        sampled = sample_clients(exp, self.wb.clients, rnd, attempt)
        rlog.sampled = [c.cid for c in sampled]
        rlog.attempts = attempt + 1
        reference = self.algo.payload_reference(state)
        prog.start_round(rnd, len(sampled))
        accepted: list[Update] = []
        for inst in self.algo.configure(rnd, state, sampled):
            cid = inst.cid
            prog.start_client(cid)
            self._broadcast(rnd, inst, state, rlog)
            steps = planned_steps(len(self.wb.clients[cid].indices), exp.train)
            verdict = judge_client(exp.faults, exp.seed, rnd, attempt, cid, steps)
            if verdict.reason is not None:
                rlog.note("dropped", cid, attempt, reason=verdict.reason)
                self.store.discard(cid)
                prog.end_client()
                continue
            try:
                data = self._train(rnd, inst, reference, prog)
            except Exception as exc:  # a client's failure never stops the round
                log.warning("round %d: client %d failed: %s: %s", rnd, cid, type(exc).__name__, exc)
                rlog.note("failed", cid, attempt, error=f"{type(exc).__name__}: {exc}")
                self.store.discard(cid)
                prog.end_client()
                continue
            rlog.bytes_up += len(data)
            update, reason = self.receive(rnd, cid, data, reference)
            if update is None:
                log.warning("round %d: update of client %d rejected: %s", rnd, cid, reason)
                rlog.note("rejected", cid, attempt, reason=reason)
                self.store.discard(cid)
            else:
                accepted.append(update)
            prog.end_client()
        return accepted

    def _round(self, rnd: int, state: State, prog: RunProgress) -> tuple[State, dict[str, Any]]:
        fed = self.exp.federation
        rlog = RoundLog()
        self.store.begin(rnd)
        attempt, skipped = 0, None
        while True:
            updates = self._attempt(rnd, attempt, state, rlog, prog)
            if len(updates) >= fed.min_clients:
                break
            self.store.rollback()
            if fed.on_too_few == "retry" and attempt < fed.max_retries:
                attempt += 1
                continue
            skipped = f"{len(updates)} of min_clients {fed.min_clients} returned after {attempt + 1} attempt(s)"
            log.warning("round %d skipped: %s", rnd, skipped)
            updates = []
            break
        if updates:
            state = self.algo.aggregate(state, updates)
        train_loss = [u.metrics["train_loss"] for u in updates if "train_loss" in u.metrics]
        row: dict[str, Any] = {
            "round": rnd,
            "train_loss": float(np.mean(train_loss)) if train_loss else None,
            "bytes_up": rlog.bytes_up,
            "bytes_down": rlog.bytes_down,
            "clients": [u.cid for u in updates],
            "sampled": rlog.sampled,
            "dropped": rlog.dropped,
            "failed": rlog.failed,
            "rejected": rlog.rejected,
            "attempts": rlog.attempts,
            "skipped": skipped,
        }
        return state, row

    # -- the run ------------------------------------------------------------------------

    def _start(self) -> tuple[int, State, RunWriter]:
        """(first round to run, server State, writer): fresh, or from the last checkpoint."""
        digest = config_digest(self.exp)
        ck = self.ckpt.load_latest() if self.resume else None
        self._resumed = ck is not None
        if ck is None:
            if self.resume:
                log.warning("no checkpoint under %s: starting from round 1", self.ckpt.dir)
            self.ckpt.clear()
            self.store.clear()
            writer = RunWriter(self.out, self.exp)
            state = self.wb.initial_state()
            t0 = time.perf_counter()
            first = self.wb.evaluate(state)
            writer.log_round({"round": 0, **first, "bytes_up": 0, "bytes_down": 0, "clients": [], "wall_s": time.perf_counter() - t0})
            self._checkpoint(0, state, digest)
            return 1, state, writer
        if ck.info.get("config_digest") != digest:
            old = ck.info.get("config", {})
            new = {k: v for k, v in self.exp.dump().items() if k in old}
            differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ResumeError(f"--resume: the config differs from the checkpointed run in {differ or 'its digest'}")
        self.algo.load_state_dict(ck.algorithm)
        self.store.recover(ck.round)
        writer = RunWriter(self.out, self.exp, resume_round=ck.round)
        log.info("resuming %s after round %d", self.out, ck.round)
        return ck.round + 1, ck.state, writer

    def _checkpoint(self, rnd: int, state: State, digest: str) -> None:
        if self.exp.server.checkpoint:
            config = {k: v for k, v in self.exp.dump().items() if k not in ("rounds", "runtime", "name")}
            info = {
                "config_digest": digest,
                "config": config,
                "client_store": {"root": "clients", "committed_round": rnd},
            }
            self.ckpt.save(rnd, state, self.algo.state_dict(), info)
        self.store.commit(rnd)

    def run(self) -> dict[str, Any]:
        exp, wb = self.exp, self.wb
        t_start = time.perf_counter()
        start, state, writer = self._start()
        resumed_from = start - 1 if self._resumed else None
        digest = config_digest(exp)
        with RunProgress(exp.rounds, self.progress_enabled) as prog:
            for rnd in range(start, exp.rounds + 1):
                t0 = time.perf_counter()
                state, row = self._round(rnd, state, prog)
                if rnd % exp.eval.every == 0 or rnd == exp.rounds:
                    row.update(wb.evaluate(state))
                row["wall_s"] = time.perf_counter() - t0
                # Per-stage bytes of the codec chains this round (codecs/chain.py: Encoded.stage_bytes summed).
                row["codec_bytes"] = {"up": self.up.take_totals(), "down": self.down.take_totals()}
                writer.log_round(row)
                self._checkpoint(rnd, state, digest)
                prog.end_round(rnd, row)
        summary = self._summary(writer.rows, time.perf_counter() - t_start, resumed_from)
        writer.finish(state, summary)
        self.final_state = state
        # Optional end-of-run task hook (causal LM: greedy generations -> generations.jsonl).
        if hasattr(wb.task, "finish"):
            wb.task.finish(wb.model, wb.tokenizer, self.out, wb.federation.frame.iloc[wb.federation.test_indices])
        return summary

    def _summary(self, rows: list[dict[str, Any]], wall_s: float, resumed_from: int | None) -> dict[str, Any]:
        first, last = rows[0], rows[-1]
        evaluated = [r for r in rows if "loss" in r]
        last_eval = evaluated[-1] if evaluated else last
        return {
            "name": self.exp.name,
            "rounds": self.exp.rounds,
            "final": {k: last_eval.get(k) for k in ("accuracy", "loss") if k in last_eval},
            "initial": {k: first.get(k) for k in ("accuracy", "loss") if k in first},
            "total_bytes_up": sum(r.get("bytes_up", 0) for r in rows),
            "total_bytes_down": sum(r.get("bytes_down", 0) for r in rows),
            "skipped_rounds": [r["round"] for r in rows if r.get("skipped")],
            "dropped": sum(len(r.get("dropped", [])) for r in rows),
            "failed": sum(len(r.get("failed", [])) for r in rows),
            "rejected": sum(len(r.get("rejected", [])) for r in rows),
            "resumed_from": resumed_from,
            "wall_s": wall_s,
            "peak_rss_mb": peak_rss_mb(),
            "fingerprint": self.wb.fingerprint,
        }


def run_local(exp, out: str | Path, progress: bool | None = None, resume: bool = False) -> dict[str, Any]:
    return LocalRuntime(exp, out, progress, resume=resume).run()
