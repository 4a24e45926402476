"""How secure aggregation's cost grows with the clients per round: SecAgg (every client a
neighbour of every other) against SecAgg+ with k neighbours (Bell et al. 2020), on the
quickstart's update size (d = 74,498: MiniLM LoRA r=8 on query/value plus the head).

    PYTHONPATH=src nice -n 10 python benchmarks/secagg_scale.py [--clients 8,16,32,64] [--neighbours 4,8] [--write-doc]

For each n and k, one round of the real exchange phases (``privacy/secagg/exchange.py``,
``mask.py``) runs in this process without a model, on random updates in [-0.1, 0.1] with
weight 1, as the round loop drives them: messages -> each client -> receive, the masking
of every client, unmasking and the decoded mean. Every message is serialized as the loop
serializes it (``codecs.serialize.to_bytes``), so the bytes are the loop's counts; the
masked train replies (the same size as plain float32 updates) are left out: only
secure aggregation's own traffic is counted. One client (id 0) drops before its masked
input, so its mask key is reconstructed and its pairwise masks removed. Columns: bytes
up and down per client (mean over the clients), the clients' compute per client (mean,
seconds: keys, shares, masking, unmasking shares) and the server's (seconds: routing,
reconstruction, unmasking), and the largest error of the mean against the plain mean
(the fixed-point rounding, at most n x 2^-15 / n here). ``--write-doc`` replaces the block
``secagg-scale`` of docs/privacy.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from fedfm.codecs.base import Payload
from fedfm.codecs.serialize import to_bytes
from fedfm.core.types import Update
from fedfm.privacy.secagg.exchange import secagg_phases
from fedfm.privacy.secagg.params import SecAggParams
from fedfm.runtime.store import ClientStore, round_tag

sys.path.insert(0, str(Path(__file__).resolve().parent))
from privacy_tables import write_block  # noqa: E402

D = 74_498  # the quickstart's shared LoRA + head values


def one_round(n: int, k: int | None, root: Path, d: int = D, dropped: tuple[int, ...] = (0,)) -> dict:
    """One secure-aggregation round of n clients of updates of length d (the clients in
    ``dropped`` drop before their masked inputs). Also used by ``privacy.py``."""
    p = SecAggParams(bound=1.0, frac_bits=14, weighting="uniform", neighbours=k)
    phases = {ph.step: ph for ph in secagg_phases(p)}
    store = ClientStore(root)
    env = types.SimpleNamespace(exp=types.SimpleNamespace(seed=0), store=store, middleware=lambda cid: [])
    state = {"instructions": {}, "attempt": 0}
    up = {c: 0 for c in range(n)}
    down = {c: 0 for c in range(n)}
    client_s, server_s = 0.0, 0.0
    for c in range(n):
        store.stage(c, round_tag(1, 0))

    def phase(step: str, participants: list[int]) -> list[int]:
        nonlocal client_s, server_s
        ph = phases[step]
        t0 = time.perf_counter()
        messages = ph.messages(1, participants, state)
        server_s += time.perf_counter() - t0
        replies = {}
        for cid, (meta, tensors) in messages.items():
            down[cid] += len(to_bytes(Payload(dict(tensors), dict(meta))))
            t0 = time.perf_counter()
            rmeta, rtensors = ph.client(env, cid, 1, meta, tensors)
            client_s += time.perf_counter() - t0
            up[cid] += len(to_bytes(Payload(dict(rtensors), dict(rmeta))))
            replies[cid] = (rmeta, rtensors)
        t0 = time.perf_counter()
        going = ph.receive(1, replies, state)
        server_s += time.perf_counter() - t0
        return going

    going = phase("route", phase("share", phase("advertise", list(range(n)))))
    rng = np.random.default_rng(n)
    xs = {c: rng.uniform(-0.1, 0.1, d).astype(np.float32) for c in going}
    masked, masked_up = [], 0
    for c in going:
        if c in dropped:
            continue  # drops before its masked input
        t0 = time.perf_counter()
        upd = Update(cid=c, payload={"w": torch.from_numpy(xs[c])}, num_examples=1)
        masked.append(phases["route"].on_train_reply(env, c, 1, upd, types.SimpleNamespace(cid=c, round=1, store=store)))
        client_s += time.perf_counter() - t0
        masked_up += len(to_bytes(Payload(dict(masked[-1].payload), dict(masked[-1].meta))))  # the masked train reply
    survivors = phase("unmask", [u.cid for u in masked])
    t0 = time.perf_counter()
    mean = phases["unmask"].transform([u for u in masked if u.cid in set(survivors)], state)
    server_s += time.perf_counter() - t0
    if not mean:
        raise SystemExit(f"n={n} k={k}: the round failed: {state['secagg'].get('failed')}")
    plain = np.mean([xs[c] for c in going if c not in dropped], axis=0)
    err = float(np.abs(mean[0].payload["w"].numpy() - plain).max())
    return {"n": n, "k": k, "up": sum(up.values()) / n, "down": sum(down.values()) / n, "client_s": client_s / n,
            "server_s": server_s, "max_err": err, "t": state["secagg"]["t"], "masked_up": masked_up,
            "plain_up": sum(len(to_bytes(Payload({"w": torch.from_numpy(xs[c])}, {}))) for c in going if c not in dropped)}


def table(rows: list[dict]) -> str:
    lines = ["| clients n | neighbours k | threshold t | bytes up / client | bytes down / client | client s / client | server s | max abs error of the mean |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = "all (SecAgg)" if r["k"] is None else str(r["k"])
        lines.append(f"| {r['n']} | {k} | {r['t']} | {r['up']:,.0f} | {r['down']:,.0f} | {r['client_s']:.3f} | {r['server_s']:.3f} | {r['max_err']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="8,16,32,64")
    ap.add_argument("--neighbours", default="4,8")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    t0 = time.perf_counter()
    for n in [int(x) for x in args.clients.split(",")]:
        for k in [None] + [int(x) for x in args.neighbours.split(",")]:
            if k is not None and k >= n - 1:
                continue  # the complete graph: the SecAgg row
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(one_round(n, k, Path(tmp)))
            print(rows[-1], flush=True)
    text = table(rows) + f"\n\n(whole script: {time.perf_counter() - t0:.0f} s wall)"
    print(text)
    if args.write_doc:
        write_block("secagg-scale", text)


if __name__ == "__main__":
    main()
