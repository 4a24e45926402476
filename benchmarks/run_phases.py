"""Where the wall time of whole quickstart runs goes: set-up (data, tokenizer, the model on
its device) against each round (round 0: the first evaluation), for batched8 and then
sequential fedfm in one process, so the second run shows what a warm process saves.

    PYTHONPATH=src python3 benchmarks/run_phases.py [--device cuda] [-o KEY=VALUE ...]

Prints one line per run; the first pays the process's one-time costs (on a GPU: the CUDA
context and the kernels' first launches).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--override", "-o", action="append", default=[], help="dotted config override for every run")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import torch

    from fedfm.config import load_config
    from fedfm.runtime import LocalRuntime

    print(f"imports {time.perf_counter() - t0:.2f} s", flush=True)
    for label, over in (("batched8", ["runtime.transport=batched", "runtime.batch_clients=8"]), ("sequential", [])):
        out = Path(tempfile.mkdtemp()) / "run"
        exp = load_config(ROOT / "examples" / "quickstart.yaml", overrides=[
            f"runtime.device={args.device}", "runtime.progress=false", f"runtime.threads={args.threads}", *args.override, *over])
        a = time.perf_counter()
        rt = LocalRuntime(exp, out)
        b = time.perf_counter()
        rt.run()
        if args.device == "cuda":
            torch.cuda.synchronize()
        c = time.perf_counter()
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        walls = [round(r.get("wall_s", 0.0), 2) for r in rows]
        print(f"{label}: set-up (data, tokenizer, model on {args.device}) {b - a:.2f} s; run {c - b:.2f} s; round walls "
              f"{walls} (round 0: the first evaluation); outside the rounds {c - b - sum(walls):.2f} s; "
              f"accuracy {rows[-1].get('accuracy')}", flush=True)


if __name__ == "__main__":
    main()
