"""The Flower transport: the round loop's envelopes as Flower Messages over a ``Grid``.

It maps fedfm client ids to Flower node ids once (asking every node which client it
serves), then carries each ``Envelope`` as a Message: the plain settings in a
``ConfigRecord``, the encoded bytes as one flat uint8 array (``payload``), and each reply
back as bytes plus the numbers the client reports (a ``MetricRecord``). With
``runtime.flower.nodes`` a node is admitted only for the client its public key is bound to
(``node_keys``); the verdicts go to ``<run>/nodes.jsonl``. Nodes are asked as they
connect, until every client is served or ``runtime.flower.wait_for_nodes_s`` is over; a
client no node serves, or two nodes claiming one client, stop the run with the nodes named
(``FlowerSetupError``). A reply that is a Flower error becomes a failed ``Reply`` (matched
by message id, since the SuperLink itself answers for a node that stopped sending
heartbeats); a client with no reply when the grid returns gets a failed ``Reply`` naming
its node. In simulation a ``stop`` event (set when Flower's runtime crashed or on Ctrl-C)
ends the wait for replies at once. Everything else (faults,
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


class FlowerSetupError(RuntimeError):
    """The deployment cannot serve the experiment (nodes missing, two nodes for one client)."""


def message(conf: dict[str, Any], data: bytes | None, node: int, kind: str) -> Message:
    content = RecordDict({CONFIG_KEY: ConfigRecord(conf)})
    if data is not None:
        content[PAYLOAD_KEY] = bytes_to_record(data)
    return Message(content, dst_node_id=node, message_type=kind)


class FlowerTransport:
    def __init__(self, grid: Grid, num_clients: int, cfg, mode: str, record: str | Path | None = None, stop=None):
        self.grid, self.num_clients, self.cfg = grid, num_clients, cfg
        self.name = f"flower-{mode}"
        self.nodes: dict[int, int] | None = None
        self.record = record  # nodes.jsonl: one verdict per node when runtime.flower.nodes binds keys
        self.verdicts: list[dict] = []
        self.bound = node_keys.bindings(cfg.nodes) if getattr(cfg, "nodes", None) else None
        self.stop = stop  # simulation: a threading.Event set when Flower's simulation runtime has crashed

    def _send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        """The grid's send_and_receive; with ``stop`` (simulation) the same push / pull loop,
        which gives up as soon as ``stop`` is set: a crashed Ray runtime answers nothing, and
        this thread must not keep the process waiting for round_timeout_s."""
        if self.stop is None:
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        pending = {i for i in self.grid.push_messages(messages) if i}
        got: list[Message] = []
        end = time.monotonic() + timeout
        while pending:
            self._check_stop()
            replies = list(self.grid.pull_messages(pending))
            got += replies
            pending -= {r.metadata.reply_to_message_id for r in replies}
            if not pending or time.monotonic() >= end:
                break
            time.sleep(0.1)
        return got

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise FlowerSetupError("the Flower simulation runtime stopped; the ServerApp gives up (see the error above)")

    def _seen(self) -> tuple[list[int], dict[int, bytes | None]]:
        """The SuperLink's node ids now (and, with bound keys, each node's public key)."""
        if self.bound is None:
            return [int(n) for n in self.grid.get_node_ids()], {}
        keys = {int(i.node_id): _key(i) for i in self.grid.get_nodes()}
        return list(keys), keys

    def _ask(self, nodes: list[int], timeout: float) -> dict[int, int | None]:
        """Ask ``nodes`` which client each serves: node -> claimed cid (None: no usable answer)."""
        claims: dict[int, int | None] = {node: None for node in nodes}
        query = [message({"want": "cid"}, None, node, QUERY) for node in nodes]
        for reply in self._send_and_receive(query, timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not say which client it serves: %s", node, error_reason(reply.error.reason))
                continue
            try:
                claims[node] = int(reply.content[CONFIG_KEY]["cid"])
            except (KeyError, TypeError, ValueError):
                log.warning("node %s answered the client-id query with no integer cid", node)
        return claims

    def _served(self, claims: dict[int, int | None], keys: dict[int, bytes | None]) -> bool:
        if self.bound is None:
            return set(range(self.num_clients)) <= set(claims.values())
        return set(self.bound) <= {keys.get(n) for n in claims}

    def discover(self) -> dict[int, int]:
        """fedfm client id -> Flower node id. Every node is asked once which client it serves,
        as it connects, until every client is served (with ``runtime.flower.nodes``: every
        bound key has answered) or ``runtime.flower.wait_for_nodes_s`` is over; a node with
        ``runtime.flower.nodes`` is admitted only for the client its key is bound to."""
        wait = self.cfg.wait_for_nodes_s
        deadline = time.monotonic() + wait
        claims: dict[int, int | None] = {}
        keys: dict[int, bytes | None] = {}
        while True:
            nodes, now_keys = self._seen()
            keys.update(now_keys)
            new = [n for n in nodes if n not in claims]
            if new:
                claims.update(self._ask(new, max(1.0, deadline - time.monotonic())))
            if self._served(claims, keys) or time.monotonic() >= deadline:
                break
            self._check_stop()
            time.sleep(0.5)
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
        return self._map(claims)

    def _map(self, claims: dict[int, int | None]) -> dict[int, int]:
        """Client -> node from the nodes' answers; a client claimed by two nodes, or a client
        no node serves, stops the run with the nodes and client ids named."""
        n = self.num_clients
        by_cid: dict[int, list[int]] = {}
        for node, cid in sorted(claims.items()):
            if cid is not None:
                by_cid.setdefault(cid, []).append(node)
        twice = {cid: nodes for cid, nodes in by_cid.items() if len(nodes) > 1 and 0 <= cid < n}
        if twice:
            cid, nodes = min(twice.items())
            raise FlowerSetupError(f"client {cid} is served by two nodes ({nodes[0]} and {nodes[1]}); "
                                   "give each SuperNode its own cid in --node-config")
        outside = {node: cid for node, cid in claims.items() if cid is not None and not 0 <= cid < n}
        for node, cid in outside.items():
            log.warning("node %s claims client %s, outside 0..%s (federation.clients is %s): it is not used", node, cid, n - 1, n)
        mapping = {cid: nodes[0] for cid, nodes in by_cid.items() if 0 <= cid < n}
        missing = sorted(set(range(n)) - set(mapping))
        if missing:
            silent = sorted(node for node, cid in claims.items() if cid is None)
            more = [f"node(s) {sorted(outside)} claim client ids {sorted(set(outside.values()))} outside 0..{n - 1}"] if outside else []
            more += [f"node(s) {silent[:10]} did not say which client they serve (no cid in --node-config?)"] if silent else []
            raise FlowerSetupError(
                f"no node serves clients {missing[:10]} (federation.clients is {n}; {len(mapping)} node(s) served a "
                f"client within runtime.flower.wait_for_nodes_s={self.cfg.wait_for_nodes_s:g})"
                + "".join(f"; {m}" for m in more)
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
        wait = timeout or self.cfg.round_timeout_s
        began = time.monotonic()
        got = self._send_and_receive(messages, wait)
        waited = time.monotonic() - began >= wait
        # The grid gives each message its id as it pushes it; the SuperLink answers a message to a
        # node that stopped sending heartbeats itself (source: the SuperLink), so match by message id.
        sent = {getattr(m.metadata, "message_id", ""): e.cid for m, e in zip(messages, envelopes)}
        sent.pop("", None)
        for reply in got:
            cid = sent.get(getattr(reply.metadata, "reply_to_message_id", ""), node_cid.get(reply.metadata.src_node_id))
            if cid is None:
                continue
            if reply.has_error():
                reason = error_reason(reply.error.reason)
                replies[cid] = Reply(cid, error=f"{reason[:500]}{' ...' if len(reason) > 500 else ''}")
                continue
            try:
                data = record_to_bytes(reply.content[PAYLOAD_KEY], f"client {cid}")
            except (KeyError, ValueError) as exc:
                replies[cid] = Reply(cid, error=f"malformed reply: {exc}")
                continue
            info = dict(reply.content[METRICS_KEY]) if METRICS_KEY in reply.content else {}
            replies[cid] = Reply(cid, data=data, info={k: float(v) for k, v in info.items()})
        limit = f"{'' if timeout else 'runtime.flower.round_timeout_s='}{wait:g} s"
        for e in envelopes:
            if e.cid not in replies:
                why = f"within {limit}" if waited else f"(the SuperLink gave none back before {limit}: its SuperNode may have left)"
                replies[e.cid] = Reply(e.cid, error=f"no reply from node {self.nodes[e.cid]} {why}")
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


def error_reason(reason) -> str:
    """Flower's text for an exception in a ClientApp, ``<class 'ValueError'>:<'message'>``,
    as ``ValueError: message``; any other reason as it is."""
    import re

    text = str(reason)
    found = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<(['\"])(.*)\2>", text, flags=re.S)
    return f"{found.group(1)}: {found.group(3)}" if found else text
