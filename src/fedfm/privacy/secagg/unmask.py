"""The server's last step of secure aggregation (Bonawitz et al. 2017): from the
survivors' masked inputs and the reconstructed secrets to the decoded weighted mean.

total = sum over survivors u of y_u - PRG(b_u), then for every dropped d and surviving
neighbour v of d (every survivor, without SecAgg+'s ``neighbours``) -/+ PRG(s_vd) (v added
+PRG(s_vd) when v < d), modulo 2^bits; the last word is sum(w),
the others sum(encode(w x)); the mean is decode(...) / sum(w).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fedfm.privacy.secagg import fixed_point
from fedfm.privacy.secagg.common import SecAggError, crypto, recover
from fedfm.privacy.secagg.mask import WEIGHT_META
from fedfm.privacy.secagg.params import SecAggParams


def masked_words(p: SecAggParams, update) -> tuple[list[str], np.ndarray]:
    """(names in order, the masked words of one update: its tensors then its weight)."""
    names = sorted(update.payload)
    flat = [update.payload[k].detach().to(torch.float64).reshape(-1).numpy() for k in names]
    words = np.concatenate(flat + [np.array([float(update.meta.get(WEIGHT_META, "nan"))])])
    if not np.all(np.isfinite(words)) or np.any(words != np.rint(words)) or np.any(words < 0) or np.any(words >= 2.0**p.bits):
        raise SecAggError(f"secagg: the masked input of client {update.cid} is not made of integers in [0, 2^{p.bits})")
    return names, words.astype(np.uint32)


def unmask_mean(p: SecAggParams, sa: dict, updates) -> dict[str, torch.Tensor]:
    """The decoded weighted mean sum(w x) / sum(w) of the survivors' inputs."""
    c = crypto()
    ring = fixed_point.ring_mask(p.bits)
    names, total = masked_words(p, updates[0])
    length = len(total)
    for u in updates[1:]:
        other_names, words = masked_words(p, u)
        if other_names != names or len(words) != length:
            raise SecAggError(f"secagg: client {u.cid}'s masked input has another layout than client {updates[0].cid}'s")
        total = total + words
    t, keys, notes = sa["t"], sa["keys"], sa["notes"]
    holders = {i + 1: u for i, u in enumerate(sorted(keys))}  # share index x -> the client that held it
    for u in sorted(x.cid for x in updates):
        b = recover(f"client {u}'s self-mask seed", sa["shares"].get((u, "b"), []), t,
                    lambda s, u=u: hashlib.sha256(s).digest() == sa["commits"][u], notes, holders)
        total = total - c.prg(b, length)
    for d in sa["dropped"]:
        s_sk = recover(f"dropped client {d}'s mask key", sa["shares"].get((d, "s"), []), t,
                       lambda s, d=d: c.public_of(s) == keys[d][1], notes, holders)
        for v in sorted(x.cid for x in updates if x.cid in sa["graph"][d]):  # d masked against its neighbours only
            mask = c.prg(c.agree(s_sk, keys[v][1], b"mask"), length)
            total = total - mask if v < d else total + mask  # v added +PRG(s_vd) when v < d
    total = total & ring
    weight = fixed_point.decode(total[-1:], 0, p.bits)[0]
    if weight <= 0:  # honest clients cap their weights (mask.py), so only a client that did not can get here
        raise SecAggError(f"secagg: the summed weight decodes to {weight:g}: the sum wrapped modulo 2^{p.bits}")
    values = fixed_point.decode(total[:-1], p.frac_bits, p.bits) / weight
    ref, out, i = updates[0].payload, {}, 0
    for k in names:
        n = ref[k].numel()
        out[k] = torch.from_numpy(values[i : i + n].copy()).reshape(ref[k].shape).to(ref[k].dtype)
        i += n
    sa["clients"], sa["weight"] = len(updates), weight
    return {k: out[k] for k in ref}
