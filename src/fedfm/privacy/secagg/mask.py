"""The client side of secure aggregation's masked input (Bonawitz et al. 2017): called by
the client function on the update after every middleware (``on_train_reply`` of the
``secagg_route`` phase), so that it masks exactly what would otherwise be sent (after
``dp_client_noise``, for distributed DP).

The update's tensors (sorted by name, flattened, float64) times the weight w (the example
count, or 1 with ``weighting: uniform``) are clipped coordinate-wise to [-bound, bound]
and encoded as round(x * 2^frac_bits) modulo 2^bits; w follows as one more word. A
weight above (2^(bits-1) - 1) // |U2| is refused (an error naming the client, the round
and the sum it could reach): then no sum of the survivors' weights can wrap. The
words plus the mask PRG(b_u) + sum_{v in U2, v != u} sign(u, v) PRG(s_uv) (modulo
2^bits; with SecAgg+'s ``neighbours``, v runs over u's neighbours in U2 only) replace
the update: the tensors carry the masked words as float32 values (exact, bits <= 24),
the metadata the masked weight, and the example count in clear is 1. The
keys, b_u, U2 and the settings come from the client's secure-aggregation record, written
by the exchange phases of the same round (``exchange.py``, ``record.py``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from fedfm.privacy.secagg import fixed_point, record
from fedfm.privacy.secagg.common import mask_vector
from fedfm.privacy.secagg.params import SimulatedDropout

log = logging.getLogger("fedfm.privacy.secagg")
WEIGHT_META = "secagg_weight"
CARRIERS = (torch.float32, torch.float64)


def weight_text(word: int, bits: int) -> str:
    """The masked weight as fixed-width decimal text (zero-padded to the digits of
    2^bits - 1): a random mask must not change the header's length, or the payload's bytes
    would differ from run to run (safetensors pads the header to 8 bytes)."""
    return format(word, f"0{len(str((1 << bits) - 1))}d")


def mask_update(update, ctx):
    """The update as masked words (see the module docstring); ``ctx`` is the client's
    ``LocalContext`` of this round (its id, round and store)."""
    cid, rnd = ctx.cid, ctx.round
    rec = record.load(ctx.store, cid, rnd, None, "secagg mask")
    bound, frac_bits, bits, uniform, drop = rec["settings"].tolist()
    frac_bits, bits = int(frac_bits), int(bits)
    if drop:
        raise SimulatedDropout(f"client {cid} dropped in phase train (simulated), before sending its masked input")
    names = sorted(update.payload)
    bad = [k for k in names if update.payload[k].dtype not in CARRIERS]
    if bad:
        raise ValueError(f"secagg: client {cid}: '{bad[0]}' is {update.payload[bad[0]].dtype}; masked words of "
                         f"{bits} bits travel in float32 or float64 tensors only")
    u2 = [int(u) for u in rec["u2"].tolist()]
    w = 1 if uniform else int(update.num_examples)
    cap = fixed_point.weight_cap(len(u2), bits)
    if w < 1:
        raise ValueError(f"secagg: client {cid} round {rnd}: weight {w}; a weight is at least 1")
    if w > cap:
        raise ValueError(f"secagg: client {cid} round {rnd}: weight {w} outside 1..{cap:,}: with {len(u2)} keyed "
                         f"clients the summed weight could reach {len(u2)} x {w:,} = {len(u2) * w:,} >= 2^{bits - 1} "
                         "and wrap; cap federation.examples_per_client or use weighting: uniform")
    flat = np.concatenate([update.payload[k].detach().to(torch.float64).reshape(-1).numpy() for k in names]) * w
    clipped = int(np.sum(np.abs(flat) > bound))
    if clipped:
        log.warning("secagg: client %d round %d: %d of %d coordinates of w * update clipped to +-%g",
                    cid, rnd, clipped, flat.size, bound)
    words = np.concatenate([fixed_point.encode(flat, bound, frac_bits, bits), np.array([w], dtype=np.uint32)])
    s_pks = {u: keys[1] for u, keys in record.roster(rec).items()}
    mine = set(rec["neighbours"].tolist())  # every other client, or SecAgg+'s neighbours
    members = [u for u in u2 if u in mine]
    masked = (words + mask_vector(cid, record.key(rec, "b"), record.key(rec, "s_sk"), s_pks, members, words.size, bits))
    masked &= fixed_point.ring_mask(bits)
    out, i = {}, 0
    for k in names:
        t = update.payload[k]
        out[k] = torch.from_numpy(masked[i : i + t.numel()].astype(np.float64)).reshape(t.shape).to(t.dtype)
        i += t.numel()
    meta = {**update.meta, WEIGHT_META: weight_text(int(masked[-1]), bits)}
    return replace(update, payload={k: out[k] for k in update.payload}, num_examples=1, meta=meta)

