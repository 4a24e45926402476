"""The round loop: it exists once, and runs over any Transport.

Per round: sample clients (runtime/sampling.py); configure one instruction each
(``Algorithm.configure``); encode each broadcast with the downlink chain (its bytes
counted; the server decodes its own broadcast into its mirror store, so the ``delta``
stage works across machines); decide simulated dropouts and deadline stragglers
(runtime/faults.py); send the rest through the transport; check, decode and validate every
reply (runtime/receive.py), counting every received payload; aggregate the accepted ones
(``Algorithm.aggregate``: steps, rule, server half, server optimizer); evaluate; ask the
clients to evaluate on their own held-out slices (``eval.clients``); append the round to
metrics.jsonl; checkpoint (runtime/checkpoint.py); settle the mirror store.

A round with fewer than ``federation.min_clients`` accepted updates (or fewer than the
aggregator rule or the learner's server part combines, ``FedAlgorithm.fewest_updates``), counted after the
server's ``updates``-stage steps (an update they leave out, e.g. a straggler past
``sim_clock``'s deadline, is rejected like one that fails validation), is retried with a
fresh sample or skipped, never aggregated. Client-store writes are staged per client and
settled by the server's decision, delivered with the next message to that client and,
after the last round, with a ``settle`` message to every client contacted
(runtime/store.py), so a rejected, failed or timed-out client, or a round redone after a
resume, never leaves a write behind, on any transport. A fresh start in a directory that
holds an earlier run's metrics, summary or final model is refused without ``overwrite``.

Every random choice derives from (seed, round, attempt, client); a run resumed from its
last checkpoint ends bit-identical to an uninterrupted one at the same thread count.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfm.codecs import CodecChain, CodecContext, CodecError
from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import from_bytes, to_bytes
from fedfm.core.protocols import SETTLE, TRAIN, Envelope, RoundContext, Transport
from fedfm.core.seeding import derive_seed
from fedfm.core.types import MODEL, Instruction, ServerState, Update, flatten_groups, unflatten_groups
from fedfm.learners.loop import planned_steps
from fedfm.runtime.algorithm import build_algorithm
from fedfm.runtime.checkpoint import RESUMABLE_CHANGES, Checkpointer, config_changes, config_digest, math_lever_changes
from fedfm.runtime.client_eval import evaluate_on_clients
from fedfm.runtime.faults import judge_client
from fedfm.runtime.outputs import RunWriter, run_summary
from fedfm.runtime.progress import RunProgress
from fedfm.runtime.receive import receive_update
from fedfm.runtime.roundlog import RoundLog
from fedfm.runtime.rundir import drop_replaced, merge_wall_time
from fedfm.runtime.sampling import clients_per_round, sample_clients
from fedfm.runtime.store import ClientStore, round_tag
from fedfm.runtime.wire import broadcast_payload, encode_settle, plain_config

log = logging.getLogger("fedfm.runtime")
AGGREGATE_TAG = 0xA66
# A finished or started run's files, which a fresh start would replace (with its server/
# and clients/ state): only with overwrite.
EARLIER_RUN = ("metrics.jsonl", "summary.json", "final.safetensors")


class ResumeError(ValueError):
    """A run directory that cannot be resumed (or started) with this config."""


class RoundLoop:
    def __init__(self, exp, out: str | Path, transport: Transport, workbench, *, resume: bool = False,
                 overwrite: bool = False, progress: RunProgress | None = None, backend: str = "local"):
        self.exp, self.out, self.transport, self.wb = exp, Path(out), transport, workbench
        self.resume, self.overwrite, self.backend = resume, overwrite, backend
        self.prog = progress or RunProgress(exp.rounds, False)
        self.algo = build_algorithm(exp)
        self.algo.bind_model(workbench.model)
        self.up = CodecChain.from_specs(exp.codecs.up, "codecs.up")
        self.down = CodecChain.from_specs(exp.codecs.down, "codecs.down")
        self.mirror = ClientStore(self.out / "server" / "mirror")
        self.ckpt = Checkpointer(self.out, exp.server.keep_checkpoints)
        self.outcomes: dict[int, tuple[str, bool]] = {}  # each contacted client's last decision
        self.mirror_outcomes: dict[int, tuple[str, bool]] = {}  # this round's, for the mirror
        self.warnings: list[str] = []
        self.sample_size = clients_per_round(exp.federation, exp.federation.clients)  # the plan an accountant reads
        # the fewest accepted updates a round aggregates: min_clients, or more where the rule needs more
        # (a round that lost clients to failures or rejections is retried or skipped, not a stopped run)
        self.need = max(exp.federation.min_clients, self.algo.fewest_updates)
        self.need_reason = (f"min_clients {exp.federation.min_clients}" if self.need == exp.federation.min_clients
                            else self.algo.fewest_reason)

    # -- one round ------------------------------------------------------------------

    def _broadcast(self, rnd: int, inst: Instruction, tag: str, rlog: RoundLog) -> bytes:
        cid = inst.cid
        self.mirror.stage(cid, tag)
        ref = self.algo.down_reference(cid, self.wb.template, json.loads(plain_config(inst.config)))
        ctx = CodecContext("down", rnd, cid, ref, seed=self.exp.seed, store=self.mirror)
        sent = self.down.encode(broadcast_payload(inst), {"round": str(rnd)}, ctx)
        rlog.bytes_down += sent.nbytes
        self.down.decode(sent.data, ctx)  # the mirror of what the client will reconstruct
        return sent.data

    def _conf(self, rnd: int, attempt: int, cid: int, contacted: set[int]) -> dict[str, Any]:
        """The plain settings of a message; the first one of a round attempt carries the
        server's decision on the client's last staged writes."""
        first = cid not in contacted
        contacted.add(cid)
        return {
            "round": rnd,
            "attempt": attempt,
            "cid": cid,
            "tag": round_tag(rnd, attempt),
            "first": "1" if first else "0",
            "settle": encode_settle(self.outcomes.get(cid)) if first else "",
            "fingerprint": self.wb.fingerprint,
        }

    def _phase(self, rnd: int, attempt: int, phase, participants: list[int], round_state: dict, rlog: RoundLog, contacted: set[int]) -> list[int]:
        """One extra exchange phase (core.protocols.ExchangePhase): send, count, receive."""
        counts = rlog.phase_bytes.setdefault(phase.name, {"down": 0, "up": 0})
        envelopes = []
        for cid, (meta, tensors) in sorted(phase.messages(rnd, list(participants), round_state).items()):
            data = to_bytes(Payload(dict(tensors), {k: str(v) for k, v in meta.items()}))
            rlog.bytes_down += len(data)
            counts["down"] += len(data)
            envelopes.append(Envelope(cid, phase.name, self._conf(rnd, attempt, cid, contacted), data))
        replies = self.transport.exchange(envelopes)
        got: dict[int, tuple[dict[str, str], dict]] = {}
        for e in envelopes:
            reply = replies.get(e.cid)
            error = "no reply in time" if reply is None else reply.error
            if error is None:
                rlog.bytes_up += len(reply.data)
                counts["up"] += len(reply.data)
                try:
                    payload = from_bytes(reply.data)
                    got[e.cid] = (payload.meta, payload.tensors)
                    continue
                except CodecError as exc:
                    error = f"undecodable reply: {exc}"
            log.warning("round %d: client %d failed in phase %s: %s", rnd, e.cid, phase.name, error)
            rlog.note("failed", e.cid, attempt, error=error, phase=phase.name)
            if phase.when == "before_train":  # after training, the phase decides what its failures mean
                self.outcomes[e.cid] = (round_tag(rnd, attempt), False)
        going_on = list(phase.receive(rnd, got, round_state))
        rlog.phase_report(phase, round_state)
        for cid in sorted(set(got) - set(going_on)):
            rlog.note("failed", cid, attempt, error=f"refused by the server in phase {phase.name}", phase=phase.name)
            if phase.when == "before_train":
                self.outcomes[cid] = (round_tag(rnd, attempt), False)
        return going_on

    def _attempt(self, rnd: int, attempt: int, server_state: ServerState, rlog: RoundLog) -> tuple[list[Update], list[int]]:
        exp = self.exp
        sampled = sample_clients(exp, self.wb.clients, rnd, attempt)
        rlog.sampled = [c.cid for c in sampled]
        rlog.attempts = attempt + 1
        tag = round_tag(rnd, attempt)
        self.prog.start_round(rnd, len(sampled))
        instructions = self.algo.configure(rnd, server_state, sampled)
        broadcasts: dict[int, bytes] = {}
        for c in sampled:
            broadcasts[c.cid] = self._broadcast(rnd, instructions[c.cid], tag, rlog)
            self.mirror_outcomes[c.cid] = (tag, False)
            steps = planned_steps(len(c.indices), exp.train)
            verdict = judge_client(exp.faults, exp.seed, rnd, attempt, c.cid, steps)
            if verdict.reason is not None:
                rlog.note("dropped", c.cid, attempt, reason=verdict.reason)
                del broadcasts[c.cid]
        participants, contacted = list(broadcasts), set()
        # the phases see the server state this round started from (read only; FedKSeed's history,
        # SplitFed's main server) and the server's workbench
        round_state: dict[str, Any] = {"instructions": {}, "attempt": attempt, "server_state": server_state, "workbench": self.wb}
        for phase in self.algo.phases_at("before_train"):
            participants = self._phase(rnd, attempt, phase, participants, round_state, rlog, contacted)
        envelopes = []
        for cid in participants:
            conf = self._conf(rnd, attempt, cid, contacted)
            conf["instruction"] = plain_config({**instructions[cid].config, **round_state["instructions"].get(cid, {})})
            envelopes.append(Envelope(cid, TRAIN, conf, broadcasts[cid]))
        replies = self.transport.exchange(envelopes)
        accepted: list[Update] = []
        for e in envelopes:
            cid, reply = e.cid, replies.get(e.cid)
            self.outcomes[cid] = (tag, False)
            if reply is None or reply.error is not None:
                error = "no reply in time" if reply is None else reply.error
                log.warning("round %d: client %d failed: %s", rnd, cid, error)
                rlog.note("failed", cid, attempt, error=error)
                continue
            rlog.bytes_up += len(reply.data)
            rlog.add_stages(reply.info)
            spec = self.algo.payload_spec(cid, server_state[MODEL])
            expected = self.wb.fingerprint if exp.server.check_fingerprint else None
            update, reason = receive_update(self.up, reply.data, rnd, cid, spec, exp.seed, exp.server.max_update_bytes, expected)
            if update is None:
                log.warning("round %d: update of client %d rejected: %s", rnd, cid, reason)
                rlog.note("rejected", cid, attempt, reason=reason)
                continue
            accepted.append(update)
            self.outcomes[cid] = self.mirror_outcomes[cid] = (tag, True)
        for phase in self.algo.phases_at("after_train"):
            going_on = set(self._phase(rnd, attempt, phase, [u.cid for u in accepted], round_state, rlog, contacted))
            accepted = phase.transform([u for u in accepted if u.cid in going_on], round_state)
            rlog.phase_report(phase, round_state)
        return accepted, [e.cid for e in envelopes]

    def _aggregate(self, rnd: int, attempt: int, server_state: ServerState, updates: list[Update],
                   rlog: RoundLog) -> tuple[ServerState, dict[str, Any], list[Update]]:
        """(new server state, the aggregation's metrics, the updates it kept). An update the
        server's ``updates``-stage steps leave out (a straggler past ``sim_clock``'s
        deadline, an outlier ``fedfa`` discards) is noted as rejected and its client's
        staged writes are settled as not accepted, as for an update validation rejects."""
        gen = torch.Generator().manual_seed(derive_seed(self.exp.seed, rnd, AGGREGATE_TAG))
        ctx = RoundContext(rnd, self.exp.seed, gen, len(self.wb.clients), self.wb.clients, self.wb, attempt,
                           rounds=self.exp.rounds, sample_size=self.sample_size, model=self.algo.model_state(server_state))
        new_state, metrics = self.algo.aggregate(server_state, updates, ctx)
        kept = set(metrics.pop("kept"))
        for u in updates:
            if u.cid not in kept:
                rlog.note("rejected", u.cid, attempt, reason="left out by the server's update steps")
                self.outcomes[u.cid] = self.mirror_outcomes[u.cid] = (round_tag(rnd, attempt), False)
        return new_state, metrics, [u for u in updates if u.cid in kept]

    def _round(self, rnd: int, server_state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        fed = self.exp.federation
        rlog = RoundLog()
        self.mirror_outcomes = {}
        attempt, skipped = 0, None
        agg_metrics: dict[str, Any] = {}
        while True:
            updates, contacted = self._attempt(rnd, attempt, server_state, rlog)
            if len(updates) >= self.need:
                new_state, agg_metrics, updates = self._aggregate(rnd, attempt, server_state, updates, rlog)
                if len(updates) >= self.need:
                    server_state = new_state
                    break
            for u in updates:  # an attempt with too few updates counts for nothing
                self.outcomes[u.cid] = self.mirror_outcomes[u.cid] = (round_tag(rnd, attempt), False)
            if fed.on_too_few == "retry" and attempt < fed.max_retries:
                attempt += 1
                continue
            skipped = f"{len(updates)} of {self.need_reason} kept after {attempt + 1} attempt(s)"
            log.warning("round %d skipped: %s", rnd, skipped)
            updates = []
            break
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
            **rlog.phase_metrics,
            **({k: v for k, v in agg_metrics.items() if k != "aggregated"} if skipped is None else {}),
        }
        row["codec_bytes"] = {"up": rlog.up_stages, "down": self.down.take_totals()}
        if rlog.phase_bytes:
            row["phase_bytes"] = rlog.phase_bytes
        return server_state, row

    def _settle_clients(self) -> None:
        """After the last round: every contacted client settles its last staged writes by the
        server's decision (a next round's first message would carry it, but there is none),
        so the client store holds what the server aggregated. Idempotent: a later resume
        sends the same decisions again."""
        envelopes = [Envelope(cid, SETTLE, {"cid": cid, "fingerprint": self.wb.fingerprint, "settle": encode_settle(o)}, b"")
                     for cid, o in sorted(self.outcomes.items())]
        replies = self.transport.exchange(envelopes)
        for e in envelopes:
            reply = replies.get(e.cid)
            if reply is None or reply.error is not None:
                log.warning("client %d could not settle its last writes: %s", e.cid, None if reply is None else reply.error)

    # -- the run --------------------------------------------------------------------

    def _fresh(self) -> ServerState:
        if self.ckpt.rounds() and not self.overwrite:
            raise ResumeError(
                f"{self.out} holds a run with checkpoints (rounds {self.ckpt.rounds()}); "
                "continue it with --resume, or replace it with --overwrite"
            )
        earlier = [n for n in EARLIER_RUN if (self.out / n).exists()]
        if earlier and not self.overwrite:
            raise ResumeError(
                f"{self.out} holds an earlier run's files ({', '.join(earlier)}) and no checkpoint to continue from; "
                "a new run would replace them: pass --overwrite (overwrite=True) or choose another directory"
            )
        self.ckpt.clear()
        for sub in ("server", "clients"):  # derived state of a replaced or unfinished run
            shutil.rmtree(self.out / sub, ignore_errors=True)
        self.mirror = ClientStore(self.out / "server" / "mirror")
        self.outcomes = {}
        return self.algo.init(self.wb.initial_state())

    def _start(self) -> tuple[int, ServerState, RunWriter, int | None]:
        """(first round to run, server state, writer, round resumed after or None)."""
        ck = self.ckpt.load_latest() if self.resume else None
        if ck is None:
            if self.resume:
                log.warning("no checkpoint under %s: starting from round 1", self.ckpt.dir)
            server_state = self._fresh()
            writer = RunWriter(self.out, self.exp)
            t0 = time.perf_counter()
            first = self.wb.evaluate(self.algo.model_state(server_state))
            row = {"round": 0, **first, "bytes_up": 0, "bytes_down": 0, "clients": [], "wall_s": time.perf_counter() - t0}
            writer.log_round(row)
            self._checkpoint(0, server_state)
            drop_replaced(self.out)  # a run replaced with --overwrite goes once this one has its first checkpoint
            return 1, server_state, writer, None
        digest = config_digest(self.exp)
        if ck.info.get("config_digest") != digest:
            old = {k: v for k, v in ck.info.get("config", {}).items() if k not in RESUMABLE_CHANGES}
            new = {k: v for k, v in self.exp.dump().items() if k in old}
            differ = config_changes(old, new)
            raise ResumeError("--resume: the config differs from the checkpointed run: "
                              f"{'; '.join(differ) if differ else 'in its digest'} (only {', '.join(RESUMABLE_CHANGES)} "
                              "may change on a resume; --overwrite starts the run again)")
        threads, notes = ck.info.get("threads"), []
        if threads != torch.get_num_threads():
            notes.append(f"--resume: the run was checkpointed with {threads} torch threads and continues with "
                         f"{torch.get_num_threads()}; float sums depend on the thread count, so the result will not be "
                         "bit-identical to an uninterrupted run (set runtime.threads to keep it)")
        levers = math_lever_changes(ck.info.get("runtime", {}), self._runtime_record(self.exp.dump()["runtime"]))
        if levers:
            notes.append(f"--resume: {'; '.join(levers)}: the float math changes from the resumed round on, so the "
                         "result will not be bit-identical to an uninterrupted run")
        for msg in notes:
            log.warning(msg)
            self.warnings.append(msg)
        server_state = {MODEL: ck.state, **unflatten_groups(ck.algorithm)}
        self.outcomes = {int(c): (t, bool(a)) for c, (t, a) in ck.info.get("client_outcomes", {}).items()}
        self.mirror.settle_all({int(c): (t, bool(a)) for c, (t, a) in ck.info.get("mirror_outcomes", {}).items()})
        writer = RunWriter(self.out, self.exp, resume_round=ck.round)
        log.info("resuming %s after round %d", self.out, ck.round)
        return ck.round + 1, server_state, writer, ck.round

    def _runtime_record(self, runtime: dict) -> dict:
        """The ``runtime`` section with the device as it resolved (``auto``: cpu or cuda), so
        that a resume on a machine where ``auto`` resolves otherwise is told so."""
        return {**runtime, "device": self.wb.device.type}

    def _checkpoint(self, rnd: int, server_state: ServerState) -> None:
        if self.exp.server.checkpoint:
            dump = self.exp.dump()
            info = {
                "config_digest": config_digest(self.exp),
                "config": {k: v for k, v in dump.items() if k not in RESUMABLE_CHANGES},
                "runtime": self._runtime_record(dump["runtime"]),  # what a resume with other levers warns about
                "threads": torch.get_num_threads(),
                "backend": self.backend,
                "client_outcomes": {str(c): list(o) for c, o in sorted(self.outcomes.items())},
                "mirror_outcomes": {str(c): list(o) for c, o in sorted(self.mirror_outcomes.items())},
            }
            rest = {g: s for g, s in server_state.items() if g != MODEL}
            self.ckpt.save(rnd, server_state[MODEL], flatten_groups(rest), info)
        for cid, (tag, accepted) in sorted(self.mirror_outcomes.items()):
            self.mirror.settle(cid, tag, accepted)
        self.mirror_outcomes = {}

    def run(self) -> dict[str, Any]:
        exp, wb = self.exp, self.wb
        t_start = time.perf_counter()
        with self.prog:
            start, server_state, writer, resumed_from = self._start()
            self.prog.begin(writer.rows)
            for rnd in range(start, exp.rounds + 1):
                t0 = time.perf_counter()
                server_state, row = self._round(rnd, server_state)
                evaluating = rnd % exp.eval.every == 0 or rnd == exp.rounds
                if evaluating:
                    row.update(wb.evaluate(self.algo.model_state(server_state)))
                    if exp.eval.clients != "none":
                        row.update(evaluate_on_clients(self.transport, self.wb, exp.eval.clients, rnd, self.algo.model_state(server_state),
                                                      row["sampled"], self.outcomes))
                row["wall_s"] = time.perf_counter() - t0
                writer.log_round(row)
                self._checkpoint(rnd, server_state)
                self.prog.end_round(rnd, row)
            self._settle_clients()
        final = self.algo.model_state(server_state)
        wall = time.perf_counter() - t_start
        summary = run_summary(writer.rows, self.exp, self.backend, wall, resumed_from, self.warnings, self.wb.fingerprint)
        summary = merge_wall_time(self.out, summary)
        writer.finish(final, summary)
        self.final_state = final
        self.server_state = server_state
        if wb.task.finish is not None:  # the task's end-of-run hook (causal LM generations)
            wb.task.finish(wb.model, wb.tokenizer, self.out, wb.federation.frame.iloc[wb.federation.test_indices])
        return summary
