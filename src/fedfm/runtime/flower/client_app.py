"""The fedfm ClientApp: the one client function (``runtime/client.py``) behind Flower's
Message API.

Message types:

- ``query`` without a phase: reply with this node's fedfm client id (node config ``cid``
  in deployment, ``partition-id`` in simulation), so the server can map clients to nodes;
  answered without loading the model (Flower may start a process per message);
- ``train``, ``evaluate``, and ``query`` with a ``phase`` (an algorithm's extra exchange):
  ``client.handle`` on this node's ``ClientEnv``; the reply carries the bytes and the
  numbers the client reports (per-stage codec bytes, its wall time).

Node config keys: ``cid`` (int), ``data-path`` (this data owner's table; see ``session``),
``store-dir`` (where this client's state lives: error-feedback residuals, what it last
received, control variates, local parameters). Run config keys: ``experiment`` and ``out``.
"""

from __future__ import annotations

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
)

_EXPERIMENTS: dict[str, Any] = {}


def run_setting(context: Context, defaults: dict[str, Any] | None, key: str, default: Any = None) -> Any:
    if defaults and key in defaults:
        return defaults[key]
    return context.run_config.get(key, default)


def node_cid(context: Context) -> int:
    cfg = context.node_config
    for key in ("cid", "partition-id"):
        if key in cfg:
            try:
                return int(cfg[key])
            except (TypeError, ValueError):
                raise ValueError(f"node {context.node_id}: node config {key}={cfg[key]!r} is not a client id (an integer)") from None
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
    return open_session(exp, key, cid, data_path, store_dir, keep=exp.runtime.flower.keep_model), cid


def answer(msg: Message, context: Context, defaults: dict[str, Any] | None) -> Message:
    from fedfm.core.protocols import Envelope
    from fedfm.runtime.client import handle

    env, cid = _session(context, defaults)
    conf = dict(msg.content[CONFIG_KEY])
    data = record_to_bytes(msg.content[PAYLOAD_KEY], f"server -> client {cid}")
    envelope = Envelope(cid=cid, phase=str(conf.pop("phase", msg.metadata.message_type)), conf=conf, data=data)
    out, info = handle(env, envelope)
    return Message(RecordDict({PAYLOAD_KEY: bytes_to_record(out), METRICS_KEY: MetricRecord(info)}), reply_to=msg)


def make_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    client = ClientApp()

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        if "phase" in msg.content[CONFIG_KEY]:
            return answer(msg, context, defaults)
        return Message(RecordDict({CONFIG_KEY: ConfigRecord({"cid": node_cid(context)})}), reply_to=msg)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return answer(msg, context, defaults)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return answer(msg, context, defaults)

    return client


app = make_client_app()
