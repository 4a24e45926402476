"""The fedfm ClientApp: ``local_update`` and the codec chains behind Flower's Message API.

Message types (see ``server_app`` for the other side):

- ``query``: reply with this node's fedfm client id (node config ``cid`` in deployment,
  ``partition-id`` in simulation), so the server can map fedfm clients to Flower nodes.
- ``train``: decode the broadcast (downlink chain), check the base model fingerprint,
  run ``Algorithm.local_update``, encode the delta (uplink chain) and reply with the bytes.
- ``evaluate``: decode the broadcast State and evaluate it on this client's own examples.

Node config keys: ``cid`` (int), ``data-path`` (this data owner's table; see
``session``), ``store-dir`` (where per-client state such as error-feedback residuals lives).
Run config keys: ``experiment`` (the experiment as JSON text) and ``out``.

``app`` reads both from Flower's Context (``flwr run``); ``make_client_app(defaults)``
builds an app whose run config is fixed in advance (``fedfm run`` in simulation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfm.runtime.flower.payload import (
    CONFIG_KEY,
    METRICS_KEY,
    PAYLOAD_KEY,
    bytes_to_record,
    config_hash,
    experiment_from_text,
    record_to_bytes,
    scalar_metrics,
)

# The model, the data and transformers are loaded on the first ``train``/``evaluate``
# only: a ``query`` (which client are you?) is answered without them, which matters
# where Flower starts a fresh ClientApp process per message (deployment).

_EXPERIMENTS: dict[str, Any] = {}


def run_setting(context: Context, defaults: dict[str, Any] | None, key: str, default: Any = None) -> Any:
    if defaults and key in defaults:
        return defaults[key]
    return context.run_config.get(key, default)


def node_cid(context: Context) -> int:
    cfg = context.node_config
    for key in ("cid", "partition-id"):
        if key in cfg:
            return int(cfg[key])
    raise ValueError(f"node {context.node_id}: node config names no client; start the SuperNode with --node-config 'cid=<id>'")


def _experiment(text: str):
    key = config_hash(text)
    if key not in _EXPERIMENTS:
        _EXPERIMENTS.clear()
        _EXPERIMENTS[key] = experiment_from_text(text)
    return _EXPERIMENTS[key], key


def _session(context: Context, defaults: dict[str, Any] | None):
    from fedfm.runtime.flower.session import check_cid, default_store_dir, open_session

    exp, key = _experiment(str(run_setting(context, defaults, "experiment", "")))
    cid = check_cid(exp, node_cid(context))
    node = context.node_config
    data_path = str(node["data-path"]) if node.get("data-path") else None
    if node.get("store-dir"):
        store_dir = Path(str(node["store-dir"]))
    elif exp.runtime.flower.mode == "simulation" and run_setting(context, defaults, "out"):
        store_dir = Path(str(run_setting(context, defaults, "out"))) / "clients"  # as the local backend
    else:
        store_dir = default_store_dir(key)
    session = open_session(exp, key, cid, data_path, store_dir, keep=exp.runtime.flower.keep_model)
    return session, cid


def _received(session, msg: Message, cid: int) -> tuple[dict, int, dict]:
    """Check the instruction is for this client and this base model; decode the State."""
    conf = msg.content[CONFIG_KEY]
    rnd = int(conf["round"])
    if int(conf["cid"]) != cid:
        raise ValueError(f"client {cid}: received an instruction addressed to client {conf['cid']}")
    if str(conf["fingerprint"]) != session.wb.fingerprint:
        raise ValueError(
            f"client {cid}: base model fingerprint {session.wb.fingerprint} differs from the "
            f"server's {conf['fingerprint']}; every node must load the same model.package/path"
        )
    from fedfm.codecs import CodecContext

    data = record_to_bytes(msg.content[PAYLOAD_KEY], f"server -> client {cid}")
    from fedfm.runtime.wire import broadcast_reference, split_broadcast

    layout = json.loads(str(conf.get("broadcast", "{}")))
    ref = broadcast_reference(session.template, layout)
    ctx = CodecContext("down", rnd, cid, ref, seed=session.exp.seed, store=session.store)
    received, _ = session.down.decode(data, ctx)
    config = json.loads(str(conf.get("instruction", "{}")))
    state, config = split_broadcast(received, session.template, config, layout)
    return state, rnd, config


def client_train(session, msg: Message, cid: int) -> RecordDict:
    from fedfm.codecs import CodecContext
    from fedfm.runtime.wire import update_meta
    from fedfm.core.types import Instruction

    t0 = time.perf_counter()
    state, rnd, extra = _received(session, msg, cid)
    inst = Instruction(round=rnd, cid=cid, state=state, config=extra)
    update = session.algo.local_update(inst, session.wb.context(cid, rnd, store=session.store))
    up_ctx = CodecContext("up", rnd, cid, session.algo.payload_reference(state), seed=session.exp.seed, store=session.store)
    meta = update_meta(cid, update, session.wb.fingerprint)
    encoded = session.up.encode(update.payload, meta, up_ctx)
    metrics = {**scalar_metrics(update.metrics), "num_examples": float(update.num_examples)}
    metrics["client_s"] = time.perf_counter() - t0
    return RecordDict({PAYLOAD_KEY: bytes_to_record(encoded.data), METRICS_KEY: MetricRecord(metrics)})


def client_evaluate(session, msg: Message, cid: int) -> RecordDict:
    from fedfm.peft import set_state

    state, _, _ = _received(session, msg, cid)
    wb = session.wb
    items = wb.examples(cid)
    bs = session.exp.eval.batch_size
    batches = [wb.task.collate(items[i : i + bs], wb.tokenizer) for i in range(0, len(items), bs)]
    set_state(wb.model, state)
    wb.model.eval()
    metrics = scalar_metrics(wb.task.evaluate(wb.model, batches))
    return RecordDict({METRICS_KEY: MetricRecord({**metrics, "num_examples": float(len(items))})})


def make_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    client = ClientApp()

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({CONFIG_KEY: ConfigRecord({"cid": node_cid(context)})}), reply_to=msg)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        session, cid = _session(context, defaults)
        return Message(client_train(session, msg, cid), reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        session, cid = _session(context, defaults)
        return Message(client_evaluate(session, msg, cid), reply_to=msg)

    return client


app = make_client_app()
