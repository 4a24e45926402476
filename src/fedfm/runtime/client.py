"""The one client function: every transport delivers an ``Envelope`` here.

``ClientEnv`` is what a client process holds: the workbench (one base model, its own
data), the algorithm's client side, the codec chains, its client store and the middleware
of the roles it serves. ``handle(env, envelope)`` answers one message:

- ``train`` (``prepare_train``, the learner's local update, ``finish_train``; the
  batched transport, runtime/batched.py, runs the middle part for several clients at
  once): apply the server's decision on this client's last staged writes
  (``settle``), stage this round's writes, decode the broadcast (downlink chain), complete
  the shared State with the client's local part (``peft.local``, from the store), run the
  middleware's ``before_train`` on the examples, train (``Algorithm.local_update``), keep
  the local part of the result in the store, run ``after_train`` on the update, and encode
  the shared payload (uplink chain) with its metadata.
- ``evaluate``: evaluate the broadcast shared State, completed with the client's local
  part, on the client's own held-out slice; reply with the metrics.
- any other phase: an extra exchange phase of the round (``core.protocols.ExchangePhase``,
  ``exchanges:`` in YAML), e.g. secure aggregation's key exchange and unmasking.

The local backend calls it in-process; the Flower ClientApp calls it from a message.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from fedfm.codecs import CodecChain, CodecContext
from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import from_bytes, to_bytes
from fedfm.core.protocols import EVALUATE, SETTLE, TRAIN, Envelope
from fedfm.core.types import Instruction, State, Update
from fedfm.learners.middleware import build_middleware
from fedfm.runtime.store import ClientStore
from fedfm.runtime.wire import decode_settle, split_broadcast, update_meta

LOCAL_KEY = "local_state"


@dataclass
class ClientEnv:
    exp: Any
    wb: Any  # runtime.workbench.Workbench
    algo: Any  # runtime.algorithm.FedAlgorithm
    up: CodecChain
    down: CodecChain
    store: ClientStore
    on_step: Callable[[int, int], None] | None = None
    _middleware: dict[str, list] = field(default_factory=dict)

    @classmethod
    def build(cls, exp, wb, algo, store: ClientStore) -> "ClientEnv":
        algo.bind_model(wb.model)
        return cls(
            exp=exp,
            wb=wb,
            algo=algo,
            up=CodecChain.from_specs(exp.codecs.up, "codecs.up"),
            down=CodecChain.from_specs(exp.codecs.down, "codecs.down"),
            store=store,
        )

    def middleware(self, cid: int) -> list:
        role = self.wb.clients[cid].profile.get("role", "default")
        if role not in self._middleware:
            specs = next((r.middleware for r in self.exp.federation.roles if r.name == role), [])
            self._middleware[role] = [build_middleware(s, f"role '{role}' middleware[{i}]") for i, s in enumerate(specs)]
        return self._middleware[role]


def check_addressed(env: ClientEnv, envelope: Envelope) -> int:
    cid = int(envelope.conf["cid"])
    if cid != envelope.cid:
        raise ValueError(f"client {envelope.cid}: received a message addressed to client {cid}")
    if not 0 <= cid < len(env.wb.clients):
        raise ValueError(f"client id {cid} is outside 0..{len(env.wb.clients) - 1} (federation.clients)")
    want = str(envelope.conf.get("fingerprint", ""))
    if want and want != env.wb.fingerprint:
        raise ValueError(
            f"client {cid}: base model fingerprint {env.wb.fingerprint} differs from the server's {want}; "
            "every node must load the same model.package/path"
        )
    return cid


def local_part(env: ClientEnv, cid: int) -> State:
    """The client's local (never shared) parameters: from its store, or the initial ones."""
    if not env.algo.local_patterns:
        return {}
    stored = env.store.get(cid, LOCAL_KEY)
    return stored if stored is not None else env.algo.split(env.wb.template)[1]


def receive_broadcast(env: ClientEnv, cid: int, rnd: int, data: bytes, config: dict) -> tuple[State, dict[str, State]]:
    ref = env.algo.down_reference(cid, env.wb.template, config)
    ctx = CodecContext("down", rnd, cid, ref, seed=env.exp.seed, store=env.store)
    received, _ = env.down.decode(data, ctx)
    return split_broadcast(received)


def open_round(env: ClientEnv, cid: int, conf: dict) -> None:
    """The first message of a round attempt settles the client's last staged writes by
    the server's decision and stages this attempt's; a later phase keeps staging there."""
    first = str(conf.get("first", "1")) == "1"
    if first:
        tag, accepted = decode_settle(str(conf.get("settle", "")))
        env.store.settle(cid, tag, accepted)
    env.store.stage(cid, str(conf["tag"]), fresh=first)


def exchange(env: ClientEnv, envelope: Envelope) -> tuple[bytes, dict[str, float]]:
    """An extra exchange phase (``core.protocols.ExchangePhase``) on the client."""
    conf = envelope.conf
    cid, rnd = check_addressed(env, envelope), int(conf["round"])
    open_round(env, cid, conf)
    received = from_bytes(envelope.data)
    meta, tensors = env.algo.phase(envelope.phase).client(env, cid, rnd, received.meta, received.tensors)
    return to_bytes(Payload(dict(tensors), dict(meta))), {}


@dataclass
class TrainJob:
    """One client's ``train`` message, prepared for its local update (``prepare_train``)."""

    cid: int
    rnd: int
    t0: float
    shared: State  # the decoded shared State (reference of the payload spec)
    local: State  # the client's local part (``peft.local``), empty when none
    inst: Instruction
    ctx: Any  # learners.base.LocalContext, after the middleware's before_train


def prepare_train(env: ClientEnv, envelope: Envelope) -> TrainJob:
    """The first half of ``train``: everything before the local update."""
    t0 = time.perf_counter()
    conf = envelope.conf
    cid, rnd = check_addressed(env, envelope), int(conf["round"])
    open_round(env, cid, conf)
    config = json.loads(conf.get("instruction", "{}"))
    shared, groups = receive_broadcast(env, cid, rnd, envelope.data, config)
    local = local_part(env, cid)
    inst = Instruction(round=rnd, cid=cid, state={**shared, **local}, config=config, broadcast=groups)
    ctx = env.wb.context(cid, rnd, on_step=env.on_step, store=env.store)
    for mw in env.middleware(cid):
        ctx.examples = mw.before_train(ctx.examples, ctx)
    return TrainJob(cid, rnd, t0, shared, local, inst, ctx)


def finish_train(env: ClientEnv, job: TrainJob, update: Update) -> tuple[bytes, dict[str, float]]:
    """The second half of ``train``: everything after the local update."""
    cid, rnd, local, ctx = job.cid, job.rnd, job.local, job.ctx
    if local:
        env.store.put(cid, LOCAL_KEY, {k: local[k] + update.payload[k].to(local[k].dtype) for k in local})
        update = replace(update, payload={k: v for k, v in update.payload.items() if k not in local})
    for mw in env.middleware(cid):
        update = mw.after_train(update, ctx)
    for phase in env.algo.phases:  # e.g. secure aggregation masks what would be sent
        if phase.on_train_reply is not None:
            update = phase.on_train_reply(env, cid, rnd, update, ctx)
    reference = env.algo.payload_spec(cid, job.shared)
    up_ctx = CodecContext("up", rnd, cid, reference, seed=env.exp.seed, store=env.store)
    encoded = env.up.encode(update.payload, update_meta(cid, update, env.wb.fingerprint), up_ctx)
    info = {f"stage.{k}": float(v) for k, v in encoded.stage_bytes.items()}
    info["client_s"] = time.perf_counter() - job.t0
    return encoded.data, info


def train(env: ClientEnv, envelope: Envelope) -> tuple[bytes, dict[str, float]]:
    job = prepare_train(env, envelope)
    update = env.algo.local_update(job.inst, job.ctx)
    return finish_train(env, job, update)


def prepare_evaluate(env: ClientEnv, envelope: Envelope) -> tuple[int, State, list[dict]]:
    """The first half of ``evaluate``: (client id, the State to evaluate, its held-out examples)."""
    conf = envelope.conf
    cid = check_addressed(env, envelope)
    view = str(conf.get("view", ""))
    if view:
        env.store.current[cid] = view  # read this round's accepted writes, commit nothing
    try:
        shared = from_bytes(envelope.data).tensors
        state = {**shared, **local_part(env, cid)}
    finally:
        env.store.current.pop(cid, None)
    return cid, state, env.wb.eval_examples(cid)


def evaluate_reply(metrics: dict[str, float], num_examples: int) -> tuple[bytes, dict[str, float]]:
    """The second half of ``evaluate``: the reply carrying the metrics."""
    meta = {f"metric.{k}": repr(float(v)) for k, v in metrics.items()}
    return to_bytes(Payload({}, {**meta, "num_examples": str(num_examples)})), {"num_examples": float(num_examples)}


def evaluate(env: ClientEnv, envelope: Envelope) -> tuple[bytes, dict[str, float]]:
    _, state, items = prepare_evaluate(env, envelope)
    if not items:
        return evaluate_reply({}, 0)
    return evaluate_reply(env.wb.evaluate(state, env.wb.batches(items)), len(items))


def settle(env: ClientEnv, envelope: Envelope) -> tuple[bytes, dict[str, float]]:
    """The end of a run: settle the client's last staged writes by the server's decision
    (otherwise they would wait for a next round that never comes)."""
    cid = check_addressed(env, envelope)
    tag, accepted = decode_settle(str(envelope.conf.get("settle", "")))
    env.store.settle(cid, tag, accepted)
    return b"", {}


def handle(env: ClientEnv, envelope: Envelope) -> tuple[bytes, dict[str, float]]:
    """Answer one message: (reply bytes, numbers the client reports about itself)."""
    if envelope.phase == TRAIN:
        return train(env, envelope)
    if envelope.phase == EVALUATE:
        return evaluate(env, envelope)
    if envelope.phase == SETTLE:
        return settle(env, envelope)
    return exchange(env, envelope)
