"""A client's secure-aggregation state between the phases of one round attempt, kept in
its client store (key ``secagg``, ``runtime/store.py``) as uint8/int64/float64 tensors:
its two X25519 private keys, the round and attempt they belong to, the roster, the ids
keyed and its neighbours among them, its self-mask seed b_u, its own shares, the
ciphertexts routed to it and the set U2.

The store is the client's own disk; the record is deleted by the client once it has sent
its unmasking shares (a client that drops before that leaves it behind until its next
round overwrites it).
"""

from __future__ import annotations

import torch

from fedfm.privacy.secagg.common import as_bytes, as_tensor

KEY = "secagg"
ROSTER_ROW = 4 + 32 + 32  # id || c_pk || s_pk


def fresh(rnd: int, attempt: int, c_sk: bytes, s_sk: bytes) -> dict[str, torch.Tensor]:
    return {"round": torch.tensor([rnd, attempt], dtype=torch.int64), "c_sk": as_tensor(c_sk), "s_sk": as_tensor(s_sk)}


def load(store, cid: int, rnd: int, attempt: int | None, who: str) -> dict[str, torch.Tensor]:
    rec = store.get(cid, KEY) if store is not None else None
    if rec is None:
        raise RuntimeError(f"{who}: client {cid} holds no secure-aggregation keys for round {rnd} "
                           "(the run needs exchanges: [{name: secagg, ...}])")
    got_round, got_attempt = (int(v) for v in rec["round"].tolist())
    if got_round != rnd or (attempt is not None and got_attempt != attempt):
        raise RuntimeError(f"{who}: client {cid} holds secure-aggregation keys of round {got_round} attempt {got_attempt}, "
                           f"not of round {rnd} attempt {attempt}")
    return rec


def attempt_of(rec) -> int:
    return int(rec["round"][1])


def key(rec, name: str) -> bytes:
    return as_bytes(rec[name])


def roster(rec) -> dict[int, tuple[bytes, bytes]]:
    """id -> (c_pk, s_pk)"""
    data = as_bytes(rec["roster"])
    out = {}
    for i in range(0, len(data), ROSTER_ROW):
        r = data[i : i + ROSTER_ROW]
        out[int.from_bytes(r[:4], "big")] = (r[4:36], r[36:68])
    return out
