"""The four phases of secure aggregation (Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", the semi-honest protocol with
AES-GCM-protected shares and without the consistency-check round), as pure client and
server functions over bytes. Every client is a neighbour of every other (the SecAgg+
k-regular graph is not implemented).

Phases and their bytes (u, v: client ids, 4-byte big-endian; d: vector length):

1. ``advertise``: u -> server: c_pk(32) || s_pk(32) (X25519 keys for encryption and for
   masks). Server -> each of U1: the roster, per u: u || c_pk || s_pk (68 bytes each).
2. ``share``: u draws the self-mask seed b_u (32 bytes) and splits b_u and s_sk (its mask
   private key) t-of-|U1| (Shamir). u -> server: SHA-256(b_u) (32, a commitment), then
   per v in U1 \\ {u}: v || len(4) || AES-GCM(KA(c_u, c_v), u || v || share_s || share_b;
   associated: round || u || v) (12 + 148 + 16 = 176 bytes). Server -> each v in U2:
   per sender u: u || len || the ciphertext addressed to v.
3. ``masked``: u -> server: y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} sign(u, v)
   PRG(s_uv) mod 2^32 (4d bytes; sign +1 when u < v, -1 when u > v; s_uv = HKDF of the
   X25519 agreement of s keys; x_u the fixed-point encoding). Server -> each v in U3: the
   survivors U3 and the dropped U2 \\ U3 (4 bytes per id).
4. ``unmask``: v -> server: per u in U2 \\ {v}: u || kind(1: b'b' for a survivor's
   self-mask share, b's' for a dropped client's mask key share) || share(70); never both
   kinds for one u. The server reconstructs b_u (checked against its commitment) for
   u in U3 and s_sk (checked against s_pk) for u in U2 \\ U3, removes the masks and
   returns sum_{u in U3} x_u exactly.

What goes wrong is recorded, not crashed on: a client that drops before sharing is left
out of U2 (its keys are never used); a share whose ciphertext fails authentication is
dropped by its recipient and noted; a share that decrypts but does not reconstruct the
committed secret is found by trying other t-subsets and noted. Fewer than t shares for a
secret is a clear ``SecAggError``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from fedfm.privacy.secagg import crypto, fixed_point, shamir
from fedfm.privacy.secagg.common import SecAggError, default_threshold, recover


@dataclass(frozen=True)
class SecAggConfig:
    length: int  # d, the vector length
    threshold: int  # t
    bound: float = 1.0
    frac_bits: int = 16
    round: int = 0


def _id(u: int) -> bytes:
    return struct.pack(">I", u)


def _frames(data: bytes, size: int) -> list[bytes]:
    if len(data) % size:
        raise ValueError(f"secagg: message of {len(data)} bytes is not a whole number of {size}-byte records")
    return [data[i : i + size] for i in range(0, len(data), size)]


def pack_items(items: dict[int, bytes]) -> bytes:
    return b"".join(_id(u) + struct.pack(">I", len(b)) + b for u, b in sorted(items.items()))


def unpack_items(data: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i < len(data):
        u, n = struct.unpack(">II", data[i : i + 8])
        out[u] = data[i + 8 : i + 8 + n]
        i += 8 + n
    return out


# -- the client ---------------------------------------------------------------------------


@dataclass
class SecAggClient:
    cid: int
    cfg: SecAggConfig
    notes: list[str] = field(default_factory=list)

    def advertise(self) -> bytes:
        self.c_sk, self.c_pk = crypto.keypair()
        self.s_sk, self.s_pk = crypto.keypair()
        return self.c_pk + self.s_pk

    def share(self, roster: bytes) -> bytes:
        self.roster = {struct.unpack(">I", r[:4])[0]: (r[4:36], r[36:68]) for r in _frames(roster, 68)}
        ids = sorted(self.roster)
        self.x_of = {u: i + 1 for i, u in enumerate(ids)}  # Shamir x of each member
        self.b = os.urandom(32)
        s_shares = shamir.split(self.s_sk, self.cfg.threshold, len(ids))
        b_shares = shamir.split(self.b, self.cfg.threshold, len(ids))
        self.held: dict[int, tuple[bytes, bytes]] = {}  # u -> (share of s_sk_u, share of b_u) held by me
        out = {}
        for v in ids:
            s_sh, b_sh = shamir.share_bytes(s_shares[self.x_of[v] - 1]), shamir.share_bytes(b_shares[self.x_of[v] - 1])
            if v == self.cid:
                self.held[v] = (s_sh, b_sh)
                continue
            key = crypto.agree(self.c_sk, self.roster[v][0], b"enc")
            ad = _id(self.cfg.round) + _id(self.cid) + _id(v)
            out[v] = crypto.encrypt(key, _id(self.cid) + _id(v) + s_sh + b_sh, ad)
        return hashlib.sha256(self.b).digest() + pack_items(out)

    def masked(self, inbox: bytes, members: list[int], x: np.ndarray) -> bytes:
        """``inbox``: the ciphertexts addressed to me; ``members``: U2, who shared."""
        self.inbox, self.members = unpack_items(inbox), sorted(members)
        y = fixed_point.encode(x, self.cfg.bound, self.cfg.frac_bits)
        y += crypto.prg(self.b, self.cfg.length)
        for v in self.members:
            if v == self.cid:
                continue
            mask = crypto.prg(crypto.agree(self.s_sk, self.roster[v][1], b"mask"), self.cfg.length)
            if self.cid < v:
                y += mask
            else:
                y -= mask
        return y.astype("<u4").tobytes()

    def unmask(self, survivors: list[int], dropped: list[int]) -> bytes:
        if set(survivors) & set(dropped):
            raise ValueError(f"client {self.cid}: the server asks for both shares of {sorted(set(survivors) & set(dropped))}")
        for u, ct in self.inbox.items():
            if u in self.held:
                continue
            key = crypto.agree(self.c_sk, self.roster[u][0], b"enc")
            try:
                plain = crypto.decrypt(key, ct, _id(self.cfg.round) + _id(u) + _id(self.cid))
            except crypto.InvalidTag:
                self.notes.append(f"share from client {u} failed authentication; not used")
                continue
            if plain[:8] != _id(u) + _id(self.cid):
                self.notes.append(f"share from client {u} names the wrong pair; not used")
                continue
            self.held[u] = (plain[8:78], plain[78:148])
        out = b""
        for u in sorted(self.held):
            if u in survivors:
                out += _id(u) + b"b" + self.held[u][1]
            elif u in dropped:
                out += _id(u) + b"s" + self.held[u][0]
        return out


# -- the server ---------------------------------------------------------------------------


@dataclass
class SecAggServer:
    cfg: SecAggConfig
    notes: list[str] = field(default_factory=list)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)

    def _count(self, phase: str, up: dict[int, bytes], down: dict[int, bytes]) -> None:
        self.bytes_up[phase] = self.bytes_up.get(phase, 0) + sum(len(b) for b in up.values())
        self.bytes_down[phase] = self.bytes_down.get(phase, 0) + sum(len(b) for b in down.values())

    def roster(self, adverts: dict[int, bytes]) -> dict[int, bytes]:
        """Phase 1: the adverts that came back -> the roster for each member of U1."""
        self.keys = {}
        for u, a in sorted(adverts.items()):
            if len(a) != 64:
                self.notes.append(f"client {u}: advert of {len(a)} bytes, not 64; left out")
                continue
            self.keys[u] = (a[:32], a[32:])
        if len(self.keys) < self.cfg.threshold:
            raise SecAggError(f"secagg: {len(self.keys)} clients advertised keys, fewer than the threshold {self.cfg.threshold}")
        roster = b"".join(_id(u) + c + s for u, (c, s) in sorted(self.keys.items()))
        down = {u: roster for u in self.keys}
        self._count("advertise", adverts, down)
        return down

    def route(self, shared: dict[int, bytes]) -> dict[int, bytes]:
        """Phase 2: each member's share message -> for each v in U2 the ciphertexts addressed to v."""
        for u in sorted(set(self.keys) - set(shared)):
            self.notes.append(f"client {u} dropped before sharing its keys; left out of the sum")
        self.commit = {u: m[:32] for u, m in shared.items() if u in self.keys}
        boxes: dict[int, dict[int, bytes]] = {v: {} for v in self.commit}
        for u, m in shared.items():
            for v, ct in unpack_items(m[32:]).items():
                if v in boxes:
                    boxes[v][u] = ct
        self.u2 = sorted(self.commit)
        if len(self.u2) < self.cfg.threshold:
            raise SecAggError(f"secagg: {len(self.u2)} clients shared keys, fewer than the threshold {self.cfg.threshold}")
        down = {v: pack_items(b) for v, b in boxes.items()}
        self._count("share", shared, down)
        return down

    def collect(self, masked: dict[int, bytes]) -> tuple[list[int], list[int]]:
        """Phase 3: the masked vectors -> (survivors U3, dropped U2 \\ U3), sent to U3."""
        self.y = {}
        for u, m in masked.items():
            if u in self.u2 and len(m) == 4 * self.cfg.length:
                self.y[u] = np.frombuffer(m, dtype="<u4").astype(np.uint32)
            else:
                self.notes.append(f"client {u}: masked input of {len(m)} bytes refused")
        self.u3 = sorted(self.y)
        self.dropped = [u for u in self.u2 if u not in self.y]
        if len(self.u3) < self.cfg.threshold:
            raise SecAggError(f"secagg: {len(self.u3)} masked inputs, fewer than the threshold {self.cfg.threshold}")
        msg = b"".join(_id(u) for u in self.u3) + b"|" + b"".join(_id(u) for u in self.dropped)
        self._count("masked", masked, {v: msg for v in self.u3})
        return self.u3, self.dropped

    def _recover(self, u: int, kind: str, shares: list[tuple[int, int]]):
        def valid(secret: bytes) -> bool:
            if kind == "b":
                return hashlib.sha256(secret).digest() == self.commit[u]
            return crypto.public_of(secret) == self.keys[u][1]

        holders = {i + 1: v for i, v in enumerate(sorted(self.keys))}
        return recover(f"client {u}'s {kind}-secret", shares, self.cfg.threshold, valid, self.notes, holders)

    def unmask(self, replies: dict[int, bytes]) -> np.ndarray:
        """Phase 4: the shares -> the exact fixed-point sum over U3 (uint32)."""
        self._count("unmask", replies, {})
        x_of = {u: i + 1 for i, u in enumerate(sorted(self.keys))}
        got: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for v, m in replies.items():
            for rec in _frames(m, 75):
                u, kind = struct.unpack(">I", rec[:4])[0], rec[4:5].decode()
                share = shamir.share_from_bytes(rec[5:])
                if share[0] != x_of.get(v):
                    self.notes.append(f"client {v} sent a share with index {share[0]}, not its own {x_of.get(v)}; not used")
                    continue
                got.setdefault((u, kind), []).append(share)
        total = fixed_point.add(*[self.y[u] for u in self.u3])
        for u in self.u3:
            total -= crypto.prg(self._recover(u, "b", got.get((u, "b"), [])), self.cfg.length)
        for d in self.dropped:
            s_sk = self._recover(d, "s", got.get((d, "s"), []))
            for v in self.u3:
                mask = crypto.prg(crypto.agree(s_sk, self.keys[v][1], b"mask"), self.cfg.length)
                if v < d:  # v added +PRG(s_vd) to y_v
                    total -= mask
                else:
                    total += mask
        return total
