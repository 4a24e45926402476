"""The Flower transport: the round loop's envelopes as Flower Messages over a ``Grid``.

It maps fedfm client ids to Flower node ids once (asking every node which client it
serves), then carries each ``Envelope`` as a Message: the plain settings in a
``ConfigRecord``, the encoded bytes as one flat uint8 array (``payload``), and each reply
back as bytes plus the numbers the client reports (a ``MetricRecord``). With
``runtime.flower.nodes`` a node is admitted only for the client its public key is bound to
(``node_keys``); the verdicts go to ``<run>/nodes.jsonl``. A reply that is a
Flower error becomes a failed ``Reply``; a client that does not answer within
``runtime.flower.round_timeout_s`` is missing from the result. Everything else (faults,
validation, byte counting, checkpoints) is the round loop's (``runtime/loop.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedfm.core.protocols import Envelope, Reply
from fedfm.runtime.flower import node_keys
from fedfm.runtime.flower.payload import CONFIG_KEY, METRICS_KEY, PAYLOAD_KEY, bytes_to_record, record_to_bytes

log = logging.getLogger("fedfm.flower")
QUERY = "query"


def message(conf: dict[str, Any], data: bytes | None, node: int, kind: str) -> Message:
    content = RecordDict({CONFIG_KEY: ConfigRecord(conf)})
    if data is not None:
        content[PAYLOAD_KEY] = bytes_to_record(data)
    return Message(content, dst_node_id=node, message_type=kind)


class FlowerTransport:
    def __init__(self, grid: Grid, num_clients: int, cfg, mode: str, record: str | Path | None = None):
        self.grid, self.num_clients, self.cfg = grid, num_clients, cfg
        self.name = f"flower-{mode}"
        self.nodes: dict[int, int] | None = None
        self.record = record  # nodes.jsonl: one verdict per node when runtime.flower.nodes binds keys
        self.verdicts: list[dict] = []
        self.bound = node_keys.bindings(cfg.nodes) if getattr(cfg, "nodes", None) else None

    def _wait(self) -> tuple[list[int], dict[int, bytes | None]]:
        """The SuperLink's node ids (and, with bound keys, each node's public key), once there
        are enough of them or the wait is over: a node per client, or every bound key present."""
        deadline = time.monotonic() + self.cfg.wait_for_nodes_s
        while True:
            if self.bound is None:
                nodes, keys = [int(n) for n in self.grid.get_node_ids()], {}
                enough = len(nodes) >= self.num_clients
            else:
                keys = {int(i.node_id): _key(i) for i in self.grid.get_nodes()}
                nodes, enough = list(keys), set(self.bound) <= set(keys.values())
            if enough or time.monotonic() >= deadline:
                return nodes, keys
            time.sleep(0.5)

    def discover(self) -> dict[int, int]:
        """fedfm client id -> Flower node id, asking every node which client it serves (and,
        with ``runtime.flower.nodes``, admitting it only for the client its key is bound to)."""
        nodes, keys = self._wait()
        query = [message({"want": "cid"}, None, node, QUERY) for node in nodes]
        claims: dict[int, int | None] = {node: None for node in nodes}
        mapping: dict[int, int] = {}
        for reply in self.grid.send_and_receive(query, timeout=self.cfg.wait_for_nodes_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not say which client it serves: %s", node, reply.error.reason)
                continue
            try:
                cid = int(reply.content[CONFIG_KEY]["cid"])
            except (KeyError, TypeError, ValueError):
                log.warning("node %s answered the client-id query with no integer cid", node)
                continue
            claims[node] = cid
            if self.bound is None:
                if cid in mapping:
                    raise ValueError(f"client {cid} is served by two nodes ({mapping[cid]} and {node}); give each SuperNode its own cid")
                mapping[cid] = node
        if self.bound is not None:
            mapping, verdicts = node_keys.admit(keys, claims, self.bound)
            for v in verdicts:
                (log.info if v.admitted else log.warning)("node %s (claims client %s): %s: %s", v.node_id, v.claimed,
                                                          "admitted" if v.admitted else "refused", v.reason)
            self.verdicts = [v.row() for v in verdicts]
            node_keys.write_rows(self.record, self.verdicts)
            if not mapping:
                raise RuntimeError(f"no node was admitted: {[v.row() for v in verdicts]}")
            return mapping
        missing = sorted(set(range(self.num_clients)) - set(mapping))
        if missing:
            raise RuntimeError(
                f"no node serves clients {missing[:10]} (federation.clients is {self.num_clients}; "
                f"{len(mapping)} node(s) answered within runtime.flower.wait_for_nodes_s={self.cfg.wait_for_nodes_s})"
            )
        return mapping

    def exchange(self, envelopes: Sequence[Envelope], timeout: float | None = None) -> dict[int, Reply]:
        if not envelopes:
            return {}
        if self.nodes is None:
            self.nodes = self.discover()
        node_cid = {node: cid for cid, node in self.nodes.items()}
        kinds = {"train": "train", "evaluate": "evaluate"}
        replies: dict[int, Reply] = {}
        for e in envelopes:  # only with bound keys can a client be left without a node
            if e.cid not in self.nodes:
                replies[e.cid] = Reply(e.cid, error=f"no admitted node serves client {e.cid} (runtime.flower.nodes; see nodes.jsonl)")
        envelopes = [e for e in envelopes if e.cid in self.nodes]
        if not envelopes:
            return replies
        messages = [message({**e.conf, "phase": e.phase}, e.data, self.nodes[e.cid], kinds.get(e.phase, "query")) for e in envelopes]
        for reply in self.grid.send_and_receive(messages, timeout=timeout or self.cfg.round_timeout_s):
            cid = node_cid.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            if reply.has_error():
                reason = str(reply.error.reason)
                replies[cid] = Reply(cid, error=f"{reason[:500]}{' ...' if len(reason) > 500 else ''}")
                continue
            try:
                data = record_to_bytes(reply.content[PAYLOAD_KEY], f"client {cid}")
            except (KeyError, ValueError) as exc:
                replies[cid] = Reply(cid, error=f"malformed reply: {exc}")
                continue
            info = dict(reply.content[METRICS_KEY]) if METRICS_KEY in reply.content else {}
            replies[cid] = Reply(cid, data=data, info={k: float(v) for k, v in info.items()})
        return replies

    def close(self) -> None:
        pass


def _key(info) -> bytes | None:
    """The canonical public key of a Flower ``NodeInfo`` (None when it has none)."""
    raw = bytes(getattr(info, "public_key", b"") or b"")
    if not raw:
        return None
    try:
        return node_keys.canonical(raw)
    except ValueError:
        return None
