"""Start-up time, per-round time and peak memory of one experiment on each backend.

    python benchmarks/flower_backends.py local      examples/quickstart.yaml --out runs/bench
    python benchmarks/flower_backends.py simulation examples/quickstart.yaml --out runs/bench
    python benchmarks/flower_backends.py deployment examples/quickstart.yaml --out runs/bench
    python benchmarks/flower_backends.py all        examples/quickstart.yaml --out runs/bench -o rounds=2
    python benchmarks/flower_backends.py table --out runs/bench

``all`` runs the three one after the other in this process, so that their times can be
compared as ratios (the machine's load is printed with each result).

Each backend runs in its own process tree; a sampler polls it every 0.5 s for the summed
resident memory of every process in the tree (SuperLink, SuperNodes, Ray actors and
ClientApp processes included) and notes when each row of metrics.jsonl appears:
start-up = launch -> round 0 row (data, model, first evaluation, and for Flower the
runtime's own start), round k = row k-1 -> row k. Results go to <out>/<backend>.json.
Deployment runs on loopback with TLS (``fedfm.runtime.flower.loopback``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent.parent


class Sampler(threading.Thread):
    def __init__(self, roots: callable, metrics: Path, t0: float):
        super().__init__(daemon=True)
        self.roots, self.metrics, self.t0 = roots, metrics, t0
        self.peak_mb, self.row_times, self.stop = 0.0, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for pid in self.roots():
                try:
                    root = psutil.Process(pid)
                    for p in [root, *root.children(recursive=True)]:
                        total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak_mb = max(self.peak_mb, total / 2**20)
            if self.metrics.exists():
                n = len(self.metrics.read_text().splitlines())
                while len(self.row_times) < n:
                    self.row_times.append(time.perf_counter() - self.t0)
            time.sleep(0.5)


OVERRIDES: list[str] = []


def fedfm_cmd(config: str, out: Path, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "fedfm", "run", config, "--out", str(out), "--no-progress"]
    for o in ("runtime.threads=2", *OVERRIDES, *overrides):
        cmd += ["-o", o]
    return cmd


def run_backend(backend: str, config: str, out: Path) -> dict:
    run_dir = out / backend
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(HERE / "src"))
    t0 = time.perf_counter()
    roots: list[int] = []
    sampler = Sampler(lambda: list(roots), metrics, t0)
    sampler.start()
    try:
        if backend == "deployment":
            sys.path.insert(0, str(HERE / "src"))
            from fedfm.config import load_config
            from fedfm.runtime.flower.deployment import export_partitions, submit
            from fedfm.runtime.flower.loopback import Loopback

            overrides = ["runtime.threads=2", *OVERRIDES, "runtime.backend=flower", "runtime.flower.mode=deployment"]
            exp = load_config(config, overrides)
            parts = export_partitions(exp, out / "partitions")
            with Loopback(out / "loopback", parts) as lb:
                roots.extend(lb.pids)
                lb.env["PYTHONPATH"] = env["PYTHONPATH"]
                done = submit(exp, run_dir, lb.name, env=lb.env)
            if done.returncode != 0:
                raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
        else:
            extra = [] if backend == "local" else ["runtime.backend=flower", "runtime.flower.num_cpus=2"]
            proc = subprocess.Popen(fedfm_cmd(config, run_dir, *extra), env=env)
            roots.append(proc.pid)
            if proc.wait() != 0:
                raise RuntimeError(f"{backend} run failed with {proc.returncode}")
    finally:
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = sampler.row_times
    rounds = [b - a for a, b in zip(times, times[1:])]
    result = {
        "backend": backend,
        "config": config,
        "overrides": OVERRIDES,
        "wall_s": wall,
        "startup_s": times[0] if times else None,
        "round_s": rounds,
        "round_wall_s_server": [r["wall_s"] for r in rows[1:]],
        "final_accuracy": rows[-1].get("accuracy"),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "peak_tree_rss_mb": sampler.peak_mb,
        "load_avg_1m": os.getloadavg()[0],
    }
    (out / f"{backend}.json").write_text(json.dumps(result, indent=2))
    return result


def table(out: Path) -> str:
    lines = [
        "| backend | start-up (s) | round 1 (s) | later rounds, mean (s) | final accuracy | bytes up | peak RSS, all processes (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend in ("local", "simulation", "deployment"):
        path = out / f"{backend}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        later = r["round_s"][1:]
        mean_later = f"{sum(later) / len(later):.1f}" if later else "-"
        lines.append(
            f"| {backend} | {r['startup_s']:.1f} | {r['round_s'][0]:.1f} | {mean_later} | "
            f"{r['final_accuracy']:.4f} | {r['bytes_up']:,} | {r['peak_tree_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("backend", choices=["local", "simulation", "deployment", "all", "table"])
    ap.add_argument("config", nargs="?", default="examples/quickstart.yaml")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-flower"))
    ap.add_argument("-o", "--override", action="append", default=[], help="dotted config override")
    args = ap.parse_args()
    OVERRIDES[:] = args.override
    args.out.mkdir(parents=True, exist_ok=True)
    if args.backend == "table":
        print(table(args.out))
        return
    backends = ["local", "simulation", "deployment"] if args.backend == "all" else [args.backend]
    for backend in backends:
        print(json.dumps(run_backend(backend, args.config, args.out), indent=2), flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
