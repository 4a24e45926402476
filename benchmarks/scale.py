"""Peak RSS of the local backend with 10 clients against 1,000 clients.

The same job twice, each in its own subprocess (peak RSS is per process): MiniLM + LoRA
(the quickstart's model and tuner), Rotten Tomatoes split IID, 11 reviews per client
(1,000 x 11 + the 1,000-review test set is what the 12,808-review corpus holds), 10
clients sampled per round, 3 rounds, seed 0. The only difference is
``federation.clients``: 10 or 1,000.

What keeps the ratio near 1: one base model in memory whatever the number of clients;
examples tokenized lazily, only for the clients a round samples; per-client state in the
disk-backed client store, not in RAM; the server keeps one small decision per contacted
client.

    PYTHONPATH=src python benchmarks/scale.py [--clients 10,1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


def job(clients: int, rounds: int) -> list[str]:
    return [
        f"federation.clients={clients}",
        "federation.partitioner={name: iid}",
        "federation.examples_per_client=11",
        "federation.clients_per_round=10",
        f"rounds={rounds}",
        "runtime.progress=false",
        "server.keep_checkpoints=1",
    ]


def child(clients: int, rounds: int, out: str) -> None:
    from fedfm.config import load_config
    from fedfm.runtime import run_local

    exp = load_config(ROOT / "examples" / "quickstart.yaml", job(clients, rounds))
    t0 = time.perf_counter()
    summary = run_local(exp, out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"clients": clients, "peak_rss_mb": rss, "wall_s": time.perf_counter() - t0,
                      "accuracy": summary["final"].get("accuracy"), "bytes_up": summary["total_bytes_up"]}))


def measure(clients: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        cmd = [sys.executable, __file__, "--child", str(clients), "--rounds", str(rounds), "--out", str(Path(tmp) / "run")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="10,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", type=int)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.rounds, args.out)
        return
    rows = [measure(int(n), args.rounds) for n in args.clients.split(",")]
    print(f"{'clients':>8} {'peak RSS MB':>12} {'wall s':>8} {'accuracy':>9} {'bytes up':>12}")
    for r in rows:
        print(f"{r['clients']:>8} {r['peak_rss_mb']:>12.0f} {r['wall_s']:>8.1f} {r['accuracy']:>9.4f} {r['bytes_up']:>12,}")
    base = rows[0]["peak_rss_mb"]
    for r in rows[1:]:
        print(f"peak RSS ratio {r['clients']} / {rows[0]['clients']} clients: {r['peak_rss_mb'] / base:.3f}")


if __name__ == "__main__":
    main()
