"""Every GPU measurement and check of the speed work, in one invocation (about 5 minutes on
one H100/H200), for a machine with one CUDA GPU and fedfm's dependencies and models
installed. Writes each part's output to ``--out`` and prints a summary.

1. ``smoke``: the tiny test job (random-init tiny BERT, tests/conftest.py) with
   ``runtime.device: cuda`` in each GPU code path not yet run on a GPU: sequential,
   ``train.unpad`` (the fused CUDA dropout kernel's mask), ``runtime.transport: batched``
   with ``runtime.batch_kernel`` ``segments`` and ``stacked``, and per-client evaluation
   through the batched transport; then the processes transport on the CPU of the GPU
   machine (its workers must hide CUDA: ``runtime/concurrent.py`` ``hide_cuda``), in a
   fresh process: one that has used CUDA cannot fork workers that train (``cuda_used``).
   Each prints its final accuracy and loss, and failed clients if any.
2. ``speed``: ``benchmarks/speed.py --device cuda`` on the full quickstart: sequential fedfm
   against ``batched2``, ``batched4``, ``batched8`` (``stacked``, the CUDA default),
   ``batched8+segments`` and ``unpad`` (the GPU goal: clients per second of the training
   phase, and of the whole run, against sequential fedfm on the same GPU).
3. ``training``: ``benchmarks/batched_lora.py`` on the quickstart's model and 8 clients x
   250 reviews: the training phase alone, sequential against K = 2, 4, 8 with both kernels,
   dropout off (how far the batched updates are from the sequential ones).

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out OUT [--parts smoke,speed,training]
        [--threads 4] [--timeout 540] [--device cuda] [--quick]

``--device cpu --quick`` is a dry run of the script itself on a machine without a GPU
(every job reduced to a few examples; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SMOKE = {
    "sequential": {},
    "unpad": {"train.unpad": True},
    "batched, segments": {"runtime.transport": "batched", "runtime.batch_clients": 2, "runtime.batch_kernel": "segments"},
    "batched, stacked": {"runtime.transport": "batched", "runtime.batch_clients": 2, "runtime.batch_kernel": "stacked"},
    # equal clients: one (K, *shape) leaf per name (learners/multi_lora.py shared_leaves)
    "batched, stacked, equal clients": {"runtime.transport": "batched", "runtime.batch_clients": 2,
                                        "runtime.batch_kernel": "stacked", "federation.examples_per_client": 16},
    "batched, per-client evaluation": {"runtime.transport": "batched", "runtime.batch_clients": 2,
                                       "federation.client_holdout": 0.2, "eval.clients": "all"},
}


def smoke(out: Path, device: str) -> list[str]:
    """The tiny job in every CUDA path; returns one summary line per path."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_config

    from fedfm.config import from_dict
    from fedfm.runtime import LocalRuntime

    lines = []
    tmp = Path(tempfile.mkdtemp())
    jobs = [(name, {"runtime.device": device, **over}) for name, over in SMOKE.items()]
    for i, (name, over) in enumerate(jobs):
        lines.append(smoke_job(name, over, tmp / f"run{i}", tiny_config, from_dict, LocalRuntime))
        print(lines[-1], flush=True)
    # in a fresh interpreter: this one has used CUDA, after which forked workers cannot train
    done = subprocess.run([sys.executable, __file__, "--processes-job", str(tmp / "processes")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines.append((done.stdout.strip().splitlines() or [f"processes on the CPU: FAILED\n{done.stderr[-2000:]}"])[-1])
    print(lines[-1], flush=True)
    (out / "smoke.txt").write_text("\n".join(lines) + "\n")
    return lines


def smoke_job(name: str, over: dict, out: Path, tiny_config, from_dict, runtime) -> str:
    """One tiny job: its final accuracy and loss, and its failed clients, in one line."""
    t0 = time.perf_counter()
    try:
        runtime(from_dict(tiny_config(out.parent, **over)), out).run()
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        failed = [f for r in rows for f in r.get("failed", [])]
        last = rows[-1]
        return (f"{name}: {time.perf_counter() - t0:.1f} s, accuracy {last.get('accuracy')}, loss {last.get('loss')}, "
                f"failed clients {json.dumps(failed)[:600]}")
    except Exception:
        return f"{name}: FAILED\n{traceback.format_exc()}"


def processes_job(out: Path) -> None:
    """The processes transport on the CPU, alone in this (fresh) process."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_config

    from fedfm.config import from_dict
    from fedfm.runtime import LocalRuntime

    out.parent.mkdir(parents=True, exist_ok=True)
    over = {"runtime.device": "cpu", "runtime.transport": "processes", "runtime.workers": 2,
            "runtime.threads_per_worker": 1, "runtime.threads": 2}
    print(smoke_job("processes on the CPU", over, out, tiny_config, from_dict, LocalRuntime), flush=True)


def script(out: Path, name: str, cmd: list[str], timeout: float) -> str:
    """Run a benchmark script, its output to ``out/name.log``; returns the log's last lines."""
    log = out / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        try:
            code = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text().splitlines()
    return f"{name}: exit {code}\n" + "\n".join(x for x in text if x.startswith("|") or "training phase" in x or "model " in x)


def main() -> None:
    if sys.argv[1:2] == ["--processes-job"]:
        return processes_job(Path(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="smoke,speed,training")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=540, help="seconds for all parts together")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script (with --quick)")
    ap.add_argument("--quick", action="store_true", help="every job reduced to a few examples (a dry run)")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_check.py needs a CUDA GPU; torch finds none here (--device cpu --quick: a dry run)")
    args.out.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.timeout
    parts = [p for p in args.parts.split(",") if p]
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (CPU dry run)"
    summary = [f"GPU: {name}; torch {torch.__version__}"]
    print(summary[0], flush=True)
    if "smoke" in parts:
        summary += smoke(args.out, args.device)
    if "speed" in parts:
        small = ["--rounds", "1", "--clients", "2", "--examples", "16", "--test-examples", "20"] if args.quick else []
        summary.append(script(args.out, "speed", [
            "benchmarks/speed.py", "--device", args.device, "--threads", str(args.threads), *small,
            "--levers", "batched2,batched4,batched8,unpad", "--best", "batched8+segments"], max(end - time.monotonic() - 60, 30)))
        print(summary[-1], flush=True)
    if "training" in parts:
        small = ["--clients", "2", "--examples", "16", "--k", "2", "--repeat", "1"] if args.quick else \
            ["--clients", "8", "--examples", "250", "--k", "2,4,8"]
        summary.append(script(args.out, "training", [
            "benchmarks/batched_lora.py", "-o", f"runtime.device={args.device}", *small,
            "--kernel", "segments,stacked", "--no-dropout", "--threads", str(args.threads)],
            max(end - time.monotonic(), 30)))
        print(summary[-1], flush=True)
    (args.out / "summary.txt").write_text("\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
