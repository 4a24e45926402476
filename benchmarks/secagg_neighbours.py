"""How many SecAgg+ neighbours keep a round attempt from failing under random dropout.

    PYTHONPATH=src nice -n 10 python benchmarks/secagg_neighbours.py [--clients 16,64,256]
        [--dropout 0.01,0.05,0.1] [--target 0.01] [--write-doc]

For each number of clients n and dropout rate δ (a client drops in each of the five
phases with probability δ, ``exchanges: [{name: secagg, dropout: {advertise: δ, ...}}]``,
the default threshold): the probability that an attempt of SecAgg (every client every
other's neighbour) fails, exact over the counts (``runtime/fault_outlook.chain_keeps``);
the smallest even k whose SecAgg+ attempt fails at most ``--target`` of the time, its
failure and threshold t (the default, 2/3 of the k + 1 holders;
``privacy/secagg/outlook.smallest_neighbours``: 4,000 simulated
attempts each, standard error at most 0.0016 near 1%); and the upload per client of
secure aggregation's share phase at that k, in encrypted shares (180 bytes each: k against
n - 1). "none" means no sparse graph reaches the target: the counts, not the graph, fail
those attempts. ``--write-doc`` replaces the block ``secagg-neighbours`` of docs/privacy.md.
"""

from __future__ import annotations

import argparse
import time

from privacy_tables import write_block

from fedfm.privacy.secagg.common import default_threshold
from fedfm.privacy.secagg.graph import holders
from fedfm.privacy.secagg.outlook import smallest_neighbours
from fedfm.privacy.secagg.params import PHASES, SecAggParams, dropout_stages
from fedfm.runtime.fault_outlook import chain_keeps

BOX = 180  # one encrypted share on the wire: id 4 + nonce 12 + 148 + tag 16


def row(n: int, delta: float, target: float) -> dict:
    p = SecAggParams(bound=1.0, dropout={ph: delta for ph in PHASES})
    complete = 1 - chain_keeps(n, 1, 0.0, lambda m: dropout_stages(p, m))
    t0 = time.perf_counter()
    k, fails = smallest_neighbours(p, n, target=target)
    return {"n": n, "delta": delta, "complete": complete, "k": k, "fails": fails,
            "t": default_threshold(holders(n, k)), "s": time.perf_counter() - t0}


def table(rows: list[dict], target: float) -> str:
    lines = [f"| clients n | dropout δ per phase | dropped by unmasking | SecAgg attempt fails | smallest k (fails ≤ {target:g}) "
             "| threshold t | SecAgg+ attempt fails | shares sent / client | search s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gone = 1 - (1 - r["delta"]) ** len(PHASES)
        if r["k"] is None:
            k, t, fails, shares = "none", "-", "-", f"{r['n'] - 1}"
        else:
            k, t, fails = str(r["k"]), str(r["t"]), f"{r['fails']:.4f}"
            shares = f"{r['n'] - 1} → {r['k']} ({(r['n'] - 1) * BOX:,} → {r['k'] * BOX:,} B)"
        lines.append(f"| {r['n']} | {r['delta']:g} | {gone:.3f} | {r['complete']:.4f} | {k} | {t} | {fails} | {shares} | "
                     f"{r['s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="16,64,256")
    ap.add_argument("--dropout", default="0.01,0.05,0.1")
    ap.add_argument("--target", type=float, default=0.01)
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.clients.split(",")]:
        for delta in [float(x) for x in args.dropout.split(",")]:
            rows.append(row(n, delta, args.target))
            print(rows[-1], flush=True)
    text = table(rows, args.target)
    print(text)
    if args.write_doc:
        write_block("secagg-neighbours", text)


if __name__ == "__main__":
    main()
