"""Run the quickstart job once per FL algorithm and print a Markdown table.

    PYTHONPATH=src python benchmarks/algorithms.py --out runs/algorithms [--only fedavg,fedadam] [--extra]
        [-o federation.examples_per_client=64 ...]

Each config in examples/algorithms/ runs in its own ``fedfm run`` process, one after the
other (torch threads 2). A row gives the test accuracy after every round, the bytes sent
up and down over the run, and the wall time. ``--extra`` adds the tuning runs (FedAdam at
server lr 0.01 and 0.1) and SCAFFOLD with the paper's option II control update.
Results accumulate in OUT/results.jsonl; ``--table`` prints the table from it without
running anything. ``-o KEY=VALUE`` overrides are passed to every run (e.g. a smaller job).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["fedavg", "fedadam", "fedprox", "scaffold", "feddyn", "fedyogi", "fedavgm", "fedadagrad"]
EXTRA = {
    "fedadam-lr0.01": ("fedadam", ["server_optimizer.lr=0.01"]),
    "fedadam-lr0.1": ("fedadam", ["server_optimizer.lr=0.1"]),
    "scaffold-optII": ("scaffold", ["learner.control_update=delta"]),
}


def run_one(label: str, config: str, overrides: list[str], out: Path, common: list[str]) -> dict:
    run_dir = out / label
    cmd = [sys.executable, "-m", "fedfm", "run", str(ROOT / "examples" / "algorithms" / f"{config}.yaml"),
           "--out", str(run_dir), "--no-progress", "-o", "runtime.threads=2"]
    for o in common + overrides:
        cmd += ["-o", o]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"label": label, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"], "wall_s": wall}
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "label": label,
        "overrides": common + overrides,
        "accuracy": [r.get("accuracy") for r in rows],
        "loss": [r.get("loss") for r in rows],
        "bytes_up": summary["total_bytes_up"],
        "bytes_down": summary["total_bytes_down"],
        "wall_s": wall,
        "run_wall_s": summary["wall_s"],
    }


def table(results: list[dict]) -> str:
    rounds = max((len(r.get("accuracy", [])) for r in results), default=0)
    head = ["algorithm"] + [f"acc r{i}" for i in range(rounds)] + ["final loss", "bytes up", "bytes down", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][0]} |")
            continue
        accs = [f"{a:.3f}" if a is not None else "-" for a in r["accuracy"]]
        loss = f"{r['loss'][-1]:.4f}" if r.get("loss") and r["loss"][-1] is not None else "-"
        lines.append(
            f"| {r['label']} | " + " | ".join(accs) + f" | {loss} | {r['bytes_up']:,} | {r['bytes_down']:,} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "algorithms")
    ap.add_argument("--only", default="", help="comma-separated labels to run")
    ap.add_argument("--extra", action="store_true", help="also run the tuning / variant runs")
    ap.add_argument("-o", "--override", action="append", default=[], help="override passed to every run")
    ap.add_argument("--table", action="store_true", help="print the table from OUT/results.jsonl and exit")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    if not args.table:
        plan = {c: (c, []) for c in CONFIGS}
        if args.extra:
            plan.update(EXTRA)
        if args.only:
            wanted = args.only.split(",")
            plan = {k: v for k, v in plan.items() if k in wanted}
        print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: {len(plan)} runs -> {args.out}", flush=True)
        for label, (config, overrides) in plan.items():
            res = run_one(label, config, overrides, args.out, args.override)
            with open(results_path, "a") as f:
                f.write(json.dumps(res) + "\n")
            print(json.dumps(res), flush=True)
    results = [json.loads(l) for l in results_path.read_text().splitlines()] if results_path.exists() else []
    for r in results:  # rows written before losses were recorded
        metrics = args.out / r["label"] / "metrics.jsonl"
        if "loss" not in r and metrics.exists():
            r["loss"] = [json.loads(l).get("loss") for l in metrics.read_text().splitlines()]
    print(table(results))


if __name__ == "__main__":
    main()
