"""Secure aggregation in real rounds: Bonawitz et al. 2017, "Practical Secure Aggregation
for Privacy-Preserving Machine Learning" (the semi-honest protocol, every client a
neighbour of every other; SecAgg+'s k-regular graph is not implemented), as exchange
phases of the round loop (``core.protocols.ExchangePhase``).

YAML: ``exchanges: [{name: secagg, bound: 0.5, frac_bits: 16, bits: 24}]``. A round:

1. ``secagg_advertise`` (before training): each client draws two X25519 key pairs (c for
   encrypting shares, s for masks), keeps the private keys in its client store and sends
   c_pk, s_pk. U1 = the clients whose keys arrived.
2. ``secagg_share``: the server sends U1's roster (with SecAgg+'s ``neighbours``: U1's ids
   and the keys of the client's neighbours only, ``graph.py``); each client draws its
   self-mask seed b_u, splits b_u and s_sk t-of-|U1| (Shamir, ``shamir.py``; SecAgg+:
   t-of-(k+1), itself and its neighbours), and sends SHA-256(b_u) and, for every other v
   in U1 (SecAgg+: every neighbour), AES-256-GCM(KA(c_u, c_v); u || v || share of s_sk ||
   share of b_u). U2 = the clients whose shares arrived.
3. ``secagg_route``: the server routes to each v in U2 the ciphertexts addressed to v and
   the set U2 (Bonawitz's round 2 downlink; a separate exchange here because the train
   message carries only the model). Only the clients that take them train.
4. ``train``: the client function hands the update x (after the client's middleware,
   e.g. ``dp_client_noise``) to ``secagg_route``'s ``on_train_reply`` (``mask.py``), which
   turns it into w * x, clipped coordinate-wise to
   [-bound, bound], encoded as integers modulo 2^bits (``fixed_point.py``), followed by the
   weight w as one more integer, and adds PRG(b_u) + sum_v sign(u, v) PRG(s_uv). The masked
   words travel as float32 values in the update's own tensors (exact below 2^24), the
   masked weight in the update's metadata; the clear example count sent is 1.
   U3 = the clients whose masked input was accepted.
5. ``secagg_unmask`` (after training): the server sends U3 and the dropped U2 \\ U3; each
   client sends its share of b_u for u in U3 and of s_sk for u in U2 \\ U3 (never both for
   one client), and deletes its record. ``transform`` reconstructs every b_u (checked
   against its commitment) and every dropped s_sk (checked against s_pk), removes the
   masks, and replaces the accepted updates by the decoded weighted mean
   sum(w x) / sum(w): each survivor's update becomes that same mean with weight 1, so
   ``fedavg``, the server optimizer and ``dp_noise`` (distributed, which counts the
   updates whose noise is in the sum) work unchanged; the server never holds an
   individual update, only masked vectors and the sum.

Weighting: ``num_examples`` (default) sends n_i * x_i and n_i, so the result is FedAvg's
example-weighted mean; ``uniform`` sends x_i and 1. ``bound`` applies to w * x.

Failures: fewer than t clients left in any phase, or a secret that no t shares
reconstruct, fails the round (no update is aggregated, the server state is unchanged) and
the loop retries or skips it (``federation.on_too_few``); the reason is logged
(``fedfm.privacy.secagg``). A ciphertext that fails authentication is dropped by its
recipient and noted; a share off the polynomial is found and noted.

Scalar training metrics (``train_loss``) travel in clear beside the masked vector. Keys
are fresh every round attempt (``os.urandom``), so masked vectors differ between runs
while the unmasked sum is exact: runs stay bit-identical.

Shamir sharing and the mask expansion are written here (``shamir.py``,
``common.mask_vector``) because no well-kept Python package offers Shamir sharing of
32-byte secrets, and the mask is a direct use of ChaCha20 from ``cryptography``; key
agreement, key derivation and encryption are ``cryptography``'s (``crypto.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from typing import Any

import torch

from fedfm.core.exchanges import register_exchange
from fedfm.core.protocols import ExchangePhaseBase
from fedfm.privacy.secagg import outlook, record, shamir
from fedfm.privacy.secagg.common import (
    CIPHERTEXT,
    SHARE_RECORD,
    SecAggError,
    as_bytes,
    as_tensor,
    crypto,
    default_threshold,
    id_bytes,
    id_of,
    ids_from,
    ids_text,
    rows,
)
from fedfm.privacy.secagg.graph import connected, graph_seed, holders, neighbours
from fedfm.privacy.secagg.mask import mask_update
from fedfm.privacy.secagg.params import SecAggParams, SimulatedDropout, dropout_stages, simulated_drop
from fedfm.privacy.secagg.unmask import unmask_mean
from fedfm.runtime.fault_outlook import register_dropout_stages

log = logging.getLogger("fedfm.privacy.secagg")
BOX = 4 + CIPHERTEXT  # peer id || ciphertext
UNMASK_ROW = 4 + 1 + SHARE_RECORD  # u || kind || share


def _ad(rnd: int, attempt: int, u: int, v: int) -> bytes:
    return id_bytes(rnd) + id_bytes(attempt) + id_bytes(u) + id_bytes(v)


class _Phase(ExchangePhaseBase):
    when = "before_train"
    step = ""

    def __init__(self, params: SecAggParams):
        self.p = params

    @property
    def name(self) -> str:
        return f"secagg_{self.step}"

    def _state(self, round_state: dict) -> dict[str, Any]:
        return round_state.setdefault("secagg", {"notes": []})

    def _fail(self, rnd: int, round_state: dict, reason: str) -> list:
        sa = self._state(round_state)
        if "failed" not in sa:
            sa["failed"], sa["failed_in"] = reason, self.name
            log.warning("round %d attempt %d: secure aggregation failed in %s: %s; the round aggregates nothing",
                        rnd, round_state.get("attempt", 0), self.name, reason)
        return []

    def metrics(self, round_state: dict) -> dict[str, Any]:
        """``<phase>.failed`` in the round's row: why secure aggregation failed in this phase."""
        sa = self._state(round_state)
        return {"failed": sa["failed"]} if sa.get("failed_in") == self.name else {}

    def _drop(self, env, cid: int, rnd: int, attempt: int) -> None:
        if simulated_drop(self.p, self.step, env.exp.seed, rnd, attempt, cid):
            raise SimulatedDropout(f"client {cid} dropped in phase {self.name} (simulated)")

    def _meta(self, round_state: dict, **extra: str) -> dict[str, str]:
        return {"attempt": str(round_state.get("attempt", 0)), **extra}

class Advertise(_Phase):
    step = "advertise"

    def messages(self, rnd, participants, round_state):
        sa = self._state(round_state)
        sa["round"], sa["t"] = rnd, self.p.threshold or default_threshold(holders(len(participants), self.p.neighbours))
        return {cid: (self._meta(round_state), {}) for cid in participants}

    def client(self, env, cid, rnd, meta, tensors):
        attempt = int(meta["attempt"])
        self._drop(env, cid, rnd, attempt)
        c = crypto()
        c_sk, c_pk = c.keypair()
        s_sk, s_pk = c.keypair()
        env.store.put(cid, record.KEY, record.fresh(rnd, attempt, c_sk, s_sk))
        return {}, {"c_pk": as_tensor(c_pk), "s_pk": as_tensor(s_pk)}

    def receive(self, rnd, replies, round_state):
        sa = self._state(round_state)
        keys = {}
        for u, (meta, t) in sorted(replies.items()):
            c_pk, s_pk = (as_bytes(t[k]) if k in t else b"" for k in ("c_pk", "s_pk"))
            if len(c_pk) != 32 or len(s_pk) != 32:
                sa["notes"].append(f"client {u}: keys of {len(c_pk)} and {len(s_pk)} bytes, not 32; left out")
                continue
            keys[u] = (c_pk, s_pk)
        sa["keys"] = keys
        if len(keys) < sa["t"]:
            return self._fail(rnd, round_state, f"{len(keys)} clients advertised keys, fewer than the threshold t = {sa['t']}")
        return sorted(keys)


class Share(_Phase):
    step = "share"

    def messages(self, rnd, participants, round_state):
        sa = self._state(round_state)
        if "failed" in sa:
            return {}
        ids = sorted(sa["keys"])
        sa["graph"] = neighbours(ids, graph_seed(rnd, round_state.get("attempt", 0), ids), self.p.neighbours)
        row = {u: id_bytes(u) + c + s for u, (c, s) in sa["keys"].items()}
        meta = self._meta(round_state, threshold=str(sa["t"]))
        if self.p.neighbours is None:  # SecAgg: everyone's keys
            table = as_tensor(b"".join(row[u] for u in ids), record.ROSTER_ROW)
            return {cid: (dict(meta), {"roster": table}) for cid in participants}
        every = as_tensor(b"".join(id_bytes(u) for u in ids))  # SecAgg+: the ids, and the neighbours' keys
        return {cid: (dict(meta), {"ids": every, "roster": as_tensor(b"".join(row[u] for u in sorted(sa["graph"][cid] | {cid})),
                                                                     record.ROSTER_ROW)}) for cid in participants}

    def client(self, env, cid, rnd, meta, tensors):
        attempt = int(meta["attempt"])
        self._drop(env, cid, rnd, attempt)
        c = crypto()
        rec = record.load(env.store, cid, rnd, attempt, self.name)
        rec["roster"] = tensors["roster"].to(torch.uint8).reshape(-1)
        roster = record.roster(rec)
        c_sk, s_sk = record.key(rec, "c_sk"), record.key(rec, "s_sk")
        if roster.get(cid) != (c.public_of(c_sk), c.public_of(s_sk)):
            raise ValueError(f"client {cid}: the roster of round {rnd} does not carry the keys it advertised")
        if self.p.neighbours is not None and "ids" not in tensors:
            raise ValueError(f"client {cid}: the share message of round {rnd} lacks the ids keyed (SecAgg+ needs them for the graph)")
        ids = [id_of(r) for r in rows(tensors["ids"], 4, "ids")] if "ids" in tensors else sorted(roster)
        t = int(meta["threshold"])
        mine = neighbours(ids, graph_seed(rnd, attempt, ids), self.p.neighbours)[cid]
        if set(roster) != mine | {cid}:
            raise ValueError(f"client {cid}: the roster of round {rnd} carries the keys of {sorted(roster)}, not of itself "
                             f"and its neighbours {sorted(mine)}")
        if not 1 <= t <= len(mine) + 1:
            raise ValueError(f"client {cid}: threshold {t} outside 1..{len(mine) + 1} (itself and its neighbours)")
        b = os.urandom(32)
        s_shares, b_shares = shamir.split(s_sk, t, len(ids)), shamir.split(b, t, len(ids))
        boxes = b""
        for i, v in enumerate(ids):  # share x = i + 1 of every secret: the holder's place in the roster
            plain = shamir.share_bytes(s_shares[i]) + shamir.share_bytes(b_shares[i])
            if v == cid:
                rec["own"] = as_tensor(plain)
                continue
            if v not in mine:  # SecAgg+: only the neighbours hold shares
                continue
            key = c.agree(c_sk, roster[v][0], b"enc")
            boxes += id_bytes(v) + c.encrypt(key, id_bytes(cid) + id_bytes(v) + plain, _ad(rnd, attempt, cid, v))
        rec["b"], rec["threshold"] = as_tensor(b), torch.tensor([t], dtype=torch.int64)
        rec["neighbours"], rec["ids"] = torch.tensor(sorted(mine), dtype=torch.int64), torch.tensor(ids, dtype=torch.int64)
        env.store.put(cid, record.KEY, rec)
        return {}, {"commit": as_tensor(hashlib.sha256(b).digest()), "boxes": as_tensor(boxes, BOX)}

    def receive(self, rnd, replies, round_state):
        sa = self._state(round_state)
        commits, boxes = {}, {v: {} for v in sa.get("keys", {})}
        for u, (meta, t) in sorted(replies.items()):
            try:
                commit = as_bytes(t["commit"])
                mine = {id_of(r): r[4:] for r in rows(t["boxes"], BOX, "share message")}
                if len(commit) != 32 or set(mine) != sa["graph"][u]:
                    raise ValueError(f"commitment of {len(commit)} bytes, shares for {sorted(mine)}")
            except (KeyError, ValueError) as exc:
                sa["notes"].append(f"client {u}: malformed share message ({exc}); left out")
                continue
            commits[u] = commit
            for v, ct in mine.items():
                boxes[v][u] = ct
        sa["commits"], sa["u2"] = commits, sorted(commits)
        sa["boxes"] = {v: {u: ct for u, ct in b.items() if u in commits} for v, b in boxes.items() if v in commits}
        if len(commits) < sa["t"]:
            return self._fail(rnd, round_state, f"{len(commits)} clients shared their keys, fewer than the threshold t = {sa['t']}")
        return sa["u2"]


class Route(_Phase):
    step = "route"

    def messages(self, rnd, participants, round_state):
        sa = self._state(round_state)
        if "failed" in sa:
            return {}
        out = {}
        for v in participants:
            inbox = b"".join(id_bytes(u) + ct for u, ct in sorted(sa["boxes"][v].items()))
            out[v] = (self._meta(round_state, u2=ids_text(sa["u2"])), {"inbox": as_tensor(inbox, BOX)})
        return out

    def client(self, env, cid, rnd, meta, tensors):
        attempt = int(meta["attempt"])
        self._drop(env, cid, rnd, attempt)
        rec = record.load(env.store, cid, rnd, attempt, self.name)
        u2 = ids_from(meta["u2"])
        if cid not in u2:
            raise ValueError(f"client {cid}: not among the clients U2 {u2} the server routes shares for")
        rec["inbox"] = tensors["inbox"].to(torch.uint8).reshape(-1)
        rec["u2"] = torch.tensor(u2, dtype=torch.int64)
        p = self.p
        drop_train = simulated_drop(p, "train", env.exp.seed, rnd, attempt, cid)
        rec["settings"] = torch.tensor([p.bound, p.frac_bits, p.bits, p.weighting == "uniform", drop_train], dtype=torch.float64)
        env.store.put(cid, record.KEY, rec)
        return {}, {}

    def on_train_reply(self, env, cid, rnd, update, ctx):
        """The client's update, after its middleware, becomes its masked input."""
        return mask_update(update, ctx)

    def receive(self, rnd, replies, round_state):
        sa = self._state(round_state)
        if len(replies) < sa["t"]:
            return self._fail(rnd, round_state, f"{len(replies)} clients took their routed shares, fewer than the threshold t = {sa['t']}")
        return sorted(replies)


class Unmask(_Phase):
    step = "unmask"
    when = "after_train"

    def messages(self, rnd, participants, round_state):
        sa = self._state(round_state)
        if "failed" in sa:
            return {}
        sa["u3"] = sorted(u for u in participants if u in sa["commits"])
        sa["dropped"] = [u for u in sa["u2"] if u not in sa["u3"]]
        if len(sa["u3"]) < sa["t"]:
            self._fail(rnd, round_state, f"{len(sa['u3'])} masked inputs arrived, fewer than the threshold t = {sa['t']}")
            return {}
        if not connected(sa["graph"], sa["u3"]):  # SecAgg+: each part's sum would be unmasked on its own
            self._fail(rnd, round_state, f"the masked inputs of {ids_text(sa['u3'])} are not connected in the neighbour graph: "
                       "unmasking would reveal the sum of each part")
            return {}
        meta = self._meta(round_state, survivors=ids_text(sa["u3"]), dropped=ids_text(sa["dropped"]))
        return {u: (dict(meta), {}) for u in sa["u3"]}

    def client(self, env, cid, rnd, meta, tensors):
        attempt = int(meta["attempt"])
        self._drop(env, cid, rnd, attempt)
        c = crypto()
        rec = record.load(env.store, cid, rnd, attempt, self.name)
        survivors, dropped = ids_from(meta["survivors"]), ids_from(meta["dropped"])
        t, u2 = int(rec["threshold"]), set(rec["u2"].tolist())
        if set(survivors) & set(dropped) or not set(survivors) | set(dropped) <= u2:
            raise ValueError(f"client {cid}: the server asks for shares of survivors {survivors} and dropped {dropped}, "
                             f"which overlap or leave the clients U2 {sorted(u2)}")
        if len(survivors) < t:
            raise ValueError(f"client {cid}: only {len(survivors)} survivors, fewer than t = {t}: no shares are sent")
        ids = rec["ids"].tolist()
        if not connected(neighbours(ids, graph_seed(rnd, attempt, ids), self.p.neighbours), survivors):
            raise ValueError(f"client {cid}: the survivors {survivors} are not connected in the neighbour graph: unmasking "
                             "would reveal the sum of each part; no shares are sent")
        roster, c_sk = record.roster(rec), record.key(rec, "c_sk")
        own = record.key(rec, "own")
        held = {cid: (own[:SHARE_RECORD], own[SHARE_RECORD:])}
        refused = []
        for r in rows(rec["inbox"], BOX, "inbox"):
            u, ct = id_of(r), r[4:]
            if u not in u2:
                continue
            try:
                plain = c.decrypt(c.agree(c_sk, roster[u][0], b"enc"), ct, _ad(rnd, attempt, u, cid))
            except c.InvalidTag:
                refused.append(u)
                continue
            if plain[:8] != id_bytes(u) + id_bytes(cid):
                refused.append(u)
                continue
            held[u] = (plain[8 : 8 + SHARE_RECORD], plain[8 + SHARE_RECORD :])
        out = b""
        for u in sorted(held):
            if u in survivors:
                out += id_bytes(u) + b"b" + held[u][1]
            elif u in dropped:
                out += id_bytes(u) + b"s" + held[u][0]
        env.store.delete(cid, record.KEY)
        return {"refused": ids_text(refused)}, {"shares": as_tensor(out, UNMASK_ROW)}

    def receive(self, rnd, replies, round_state):
        sa = self._state(round_state)
        x_of = {u: i + 1 for i, u in enumerate(sorted(sa["keys"]))}
        got: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for v, (meta, t) in sorted(replies.items()):
            for u in ids_from(meta.get("refused", "")):
                sa["notes"].append(f"client {v}: the share from client {u} failed authentication; not used")
            try:
                records = rows(t["shares"], UNMASK_ROW, "unmask message")
            except (KeyError, ValueError) as exc:
                sa["notes"].append(f"client {v}: malformed unmask message ({exc}); not used")
                continue
            for r in records:
                u, kind, share = id_of(r), r[4:5].decode("latin-1"), shamir.share_from_bytes(r[5:])
                if share[0] != x_of.get(v) or kind not in ("b", "s"):
                    sa["notes"].append(f"client {v}: a share of kind {kind!r} with index {share[0]}, not its own {x_of.get(v)}; not used")
                    continue
                got.setdefault((u, kind), []).append(share)
        sa["shares"] = got
        if len(replies) < sa["t"]:
            return self._fail(rnd, round_state, f"{len(replies)} clients sent unmasking shares, fewer than the threshold t = {sa['t']}")
        return list(sa["u3"])  # a survivor silent here is still in the sum: its b_u comes from the others' shares

    def transform(self, updates, round_state):
        sa = self._state(round_state)
        if "failed" in sa or not updates:
            return []
        try:
            mean = unmask_mean(self.p, sa, updates)
        except SecAggError as exc:
            return self._fail(sa.get("round", -1), round_state, str(exc))
        for note in sa["notes"]:
            log.warning("secure aggregation: %s", note)
        return [replace(u, payload=mean, num_examples=1) for u in updates]


def secagg_phases(params: SecAggParams) -> list:
    return [Advertise(params), Share(params), Route(params), Unmask(params)]


register_exchange("secagg", secagg_phases, SecAggParams)
register_dropout_stages("secagg", dropout_stages, outlook.estimate)

