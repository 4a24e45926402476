"""The server's round loop over a Flower ``Grid``: configure, send, decode, aggregate.

The same loop as the local backend (``runtime.local``), with Flower carrying the bytes:
per round the server samples clients with ``sample_clients`` (same seed, same choice),
encodes each instruction's State with the downlink chain, sends it to the node that
serves that client, decodes every reply with the uplink chain, aggregates the updates in
the order the clients were sampled (so the sum is the local backend's, bit for bit),
evaluates on the held-out test set and writes metrics.jsonl / summary.json /
final.safetensors through ``RunWriter``. A client whose reply is an error, or whose
bytes do not decode, is logged and left out of that round; the round goes on.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedfm.codecs import CodecChain, CodecContext
from fedfm.core.types import State, Update
from fedfm.runtime.algorithm import Algorithm
from fedfm.runtime.flower.payload import CONFIG_KEY, PAYLOAD_KEY, bytes_to_record, record_to_bytes
from fedfm.runtime.local import sample_clients
from fedfm.runtime.outputs import RunWriter, peak_rss_mb
from fedfm.runtime.store import ClientStore
from fedfm.runtime.validate import check_size, check_update
from fedfm.runtime.wire import broadcast_layout, broadcast_payload, broadcast_reference, metrics_from_meta
from fedfm.runtime.workbench import Workbench

log = logging.getLogger("fedfm.flower")


class FlowerServer:
    def __init__(self, exp, out: str | Path, grid: Grid, workbench: Workbench | None = None):
        self.exp = exp
        self.out = Path(out)
        self.grid = grid
        self.cfg = exp.runtime.flower
        self.wb = workbench or Workbench(exp)
        self.algo = Algorithm(exp)
        self.up = CodecChain.from_specs(exp.codecs.up, "codecs.up")
        self.down = CodecChain.from_specs(exp.codecs.down, "codecs.down")
        self.store = ClientStore(self.out / "clients")
        self.rejected: list[dict[str, Any]] = []

    # -- nodes ---------------------------------------------------------------------

    def discover(self) -> dict[int, int]:
        """fedfm client id -> Flower node id, asking every node which client it serves."""
        want = self.exp.federation.clients
        deadline = time.monotonic() + self.cfg.wait_for_nodes_s
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = list(self.grid.get_node_ids())
        query = [self._message({"want": "cid"}, None, node, "query") for node in nodes]
        mapping: dict[int, int] = {}
        for reply in self.grid.send_and_receive(query, timeout=self.cfg.wait_for_nodes_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not say which client it serves: %s", node, reply.error.reason)
                continue
            cid = int(reply.content[CONFIG_KEY]["cid"])
            if cid in mapping:
                raise ValueError(f"client {cid} is served by two nodes ({mapping[cid]} and {node}); give each SuperNode its own cid")
            mapping[cid] = node
        missing = sorted(set(range(want)) - set(mapping))
        if missing:
            raise RuntimeError(
                f"no node serves clients {missing[:10]} (federation.clients is {want}; "
                f"{len(mapping)} node(s) answered within runtime.flower.wait_for_nodes_s={self.cfg.wait_for_nodes_s})"
            )
        return mapping

    def _message(self, conf: dict[str, Any], data: bytes | None, node: int, kind: str) -> Message:
        content = RecordDict({CONFIG_KEY: ConfigRecord(conf)})
        if data is not None:
            content[PAYLOAD_KEY] = bytes_to_record(data)
        return Message(content, dst_node_id=node, message_type=kind)

    # -- one round -----------------------------------------------------------------

    def _send(self, rnd: int, state: State, sampled, nodes: dict[int, int]) -> tuple[list[Message], int]:
        messages, down = [], 0
        for inst in self.algo.configure(rnd, state, sampled):
            layout = broadcast_layout(inst.config)
            ref = broadcast_reference(state, layout)
            ctx = CodecContext("down", rnd, inst.cid, ref, seed=self.exp.seed, store=self.store)
            sent = self.down.encode(broadcast_payload(inst), {"round": str(rnd)}, ctx)
            down += sent.nbytes
            plain = {k: v for k, v in inst.config.items() if k not in layout}
            conf = {
                "round": rnd,
                "cid": inst.cid,
                "fingerprint": self.wb.fingerprint,
                "instruction": json.dumps(plain),
                "broadcast": json.dumps(layout),
            }
            messages.append(self._message(conf, sent.data, nodes[inst.cid], "train"))
        return messages, down

    def _receive(self, rnd: int, state: State, replies, node_cid: dict[int, int]) -> tuple[list[Update], int]:
        ref = self.algo.payload_reference(state)
        by_cid: dict[int, Update] = {}
        up = 0
        for reply in replies:
            cid = node_cid.get(reply.metadata.src_node_id, -1)
            try:
                if reply.has_error():
                    reason = str(reply.error.reason)
                    raise RuntimeError(f"client {cid} failed: {reason[:500]}{' ...' if len(reason) > 500 else ''}")
                data = record_to_bytes(reply.content[PAYLOAD_KEY], f"client {cid}")
                reason = check_size(len(data), self.exp.server.max_update_bytes)
                if reason is not None:
                    raise ValueError(reason)
                ctx = CodecContext("up", rnd, cid, ref, seed=self.exp.seed, store=self.store)
                payload, meta = self.up.decode(data, ctx)
                if int(meta["cid"]) != cid:
                    raise ValueError(f"client {cid}: payload claims to come from client {meta['cid']}")
                expected = self.wb.fingerprint if self.exp.server.check_fingerprint else None
                reason = check_update(payload, meta, ref, expected)
                if reason is not None:
                    raise ValueError(reason)
            except (ValueError, KeyError, RuntimeError) as exc:
                log.warning("round %d: rejected the update of client %s: %s", rnd, cid, exc)
                self.rejected.append({"round": rnd, "cid": cid, "reason": str(exc)})
                continue
            metrics = metrics_from_meta(meta)
            by_cid[cid] = Update(cid=cid, payload=payload, num_examples=int(meta["num_examples"]), metrics=metrics, meta=meta)
            up += len(data)
        return [by_cid[c] for c in sorted(by_cid)], up

    def run(self) -> dict[str, Any]:
        exp, wb = self.exp, self.wb
        t_start = time.perf_counter()
        writer = RunWriter(self.out, exp)
        state = wb.initial_state()
        t0 = time.perf_counter()
        first = wb.evaluate(state)
        writer.log_round({"round": 0, **first, "bytes_up": 0, "bytes_down": 0, "clients": [], "wall_s": time.perf_counter() - t0})
        nodes = self.discover()
        node_cid = {node: cid for cid, node in nodes.items()}
        totals = {"bytes_up": 0, "bytes_down": 0}
        for rnd in range(1, exp.rounds + 1):
            t0 = time.perf_counter()
            sampled = sample_clients(exp, wb.clients, rnd)
            messages, down = self._send(rnd, state, sampled, nodes)
            replies = self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout_s)
            updates, up = self._receive(rnd, state, replies, node_cid)
            for cid in sorted({c.cid for c in sampled} - {u.cid for u in updates} - {r["cid"] for r in self.rejected if r["round"] == rnd}):
                log.warning("round %d: no reply from client %d within %.0fs", rnd, cid, self.cfg.round_timeout_s)
                self.rejected.append({"round": rnd, "cid": cid, "reason": "no reply within runtime.flower.round_timeout_s"})
            if not updates:
                raise RuntimeError(f"round {rnd}: no client update arrived; see the log for each client's error")
            state = self.algo.aggregate(state, updates)
            row: dict[str, Any] = {"round": rnd}
            if rnd % exp.eval.every == 0 or rnd == exp.rounds:
                row.update(wb.evaluate(state))
            losses = [u.metrics["train_loss"] for u in updates if "train_loss" in u.metrics]
            row.update(
                {
                    "train_loss": float(np.mean(losses)) if losses else None,
                    "bytes_up": up,
                    "bytes_down": down,
                    "clients": [u.cid for u in updates],
                    "wall_s": time.perf_counter() - t0,
                }
            )
            totals["bytes_up"] += up
            totals["bytes_down"] += down
            writer.log_round(row)
            log.info("round %d: %s", rnd, {k: row[k] for k in ("accuracy", "loss", "bytes_up") if k in row})
        last = writer.rows[-1]
        summary = {
            "name": exp.name,
            "rounds": exp.rounds,
            "backend": f"flower-{self.cfg.mode}",
            "final": {k: last.get(k) for k in ("accuracy", "loss") if k in last},
            "initial": {k: first.get(k) for k in ("accuracy", "loss") if k in first},
            "total_bytes_up": totals["bytes_up"],
            "total_bytes_down": totals["bytes_down"],
            "wall_s": time.perf_counter() - t_start,
            "peak_rss_mb": peak_rss_mb(),
            "fingerprint": wb.fingerprint,
            "rejected": self.rejected,
        }
        writer.finish(state, summary)
        self.final_state = state
        return summary
