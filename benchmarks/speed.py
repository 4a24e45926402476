"""Speed levers of fedfm against the plain sequential loop, in one invocation.

Runs, each in its own subprocess (so that peak memory is measured per configuration), on
one job (default: examples/quickstart.yaml, reducible with --rounds/--clients/--examples):

- ``plain``: the plain transformers + peft + torch FedAvg loop of benchmarks/overhead.py
  (CPU only; left out with --device cuda);
- ``fedfm``: fedfm's local runtime, sequential transport, ``--threads`` torch threads;
- ``fedfm 1 thread``: the same with one thread: the bit-exact reference of the processes
  transport (float sums depend on the thread count);
- each lever alone: ``processes`` (``--threads`` workers of one thread each),
  ``eval unsorted`` (the length-sorted evaluation turned OFF: what sorting buys),
  ``bf16``, ``compile``, ``bucket``, ``unpad`` (padding-free BERT training),
  ``eval_unpad`` (padding-free evaluation; not in the default ``--levers``),
  ``parent`` (the processes transport with ``--threads`` - 1 workers and the run's own
  process training too), ``batched2`` / ``batched4`` / ``batched8`` (``runtime.transport:
  batched`` with 2 / 4 / 8 clients' LoRA in one forward pass; not in the default
  ``--levers``), and ``segments`` / ``stacked`` (``runtime.batch_kernel``, only combined
  with a batched lever, e.g. ``--best batched8+segments``: alone, the config is refused);
- the combinations given with ``--best`` (default: ``processes`` and ``processes+bucket``).

For each: wall time, the wall time spent in the round's training phase (``train_s``:
the transport's ``exchange`` of ``train`` messages, client preparation and encoding
included; fedfm rows only), CPU time (user + sys of the subprocess and its reaped workers),
peak RSS of the main process, peak PSS of the process tree (sampled every 0.25 s: shared
copy-on-write pages counted once, split between the processes sharing them; the fair
memory figure for worker processes), final accuracy and loss, clients trained per second
(over the whole run, and over the training phase alone: client trainings / ``train_s``),
and the ratios against ``plain`` (or against ``fedfm`` when there is no plain row).
Prints a markdown table.

    PYTHONPATH=src python benchmarks/speed.py [--config examples/quickstart.yaml] [--threads 2]
        [--device cpu|cuda|auto] [--rounds 3] [--clients 8] [--examples 250] [--test-examples 1000]
        [--levers processes,eval_unsorted,bf16,compile,bucket] [--best processes --best processes+bucket]
        [--parallel]

``--parallel`` (for an idle machine with many cores) starts every configuration at once,
each pinned with ``sched_setaffinity`` to its own ``--threads`` cores, so that each sees a
``--threads``-core machine; they still share the memory bandwidth and the last-level cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LEVERS = {
    "processes": lambda t: ["runtime.transport=processes", f"runtime.workers={t}", "runtime.threads_per_worker=1"],
    "eval_unsorted": lambda t: ["eval.sort_by_length=false"],
    "bf16": lambda t: ["train.autocast=bf16"],
    "compile": lambda t: ["train.compile=true"],
    "bucket": lambda t: ["train.bucket_by_length=true"],
    # padding-free BERT training (learners/unpad.py): same math and dropout masks
    "unpad": lambda t: ["train.unpad=true"],
    # the same for the per-round evaluation of the test set
    "eval_unpad": lambda t: ["eval.unpad=true"],
    # the processes transport with the run's own process as one of the trainers
    "parent": lambda t: ["runtime.transport=processes", f"runtime.workers={max(1, t - 1)}",
                         "runtime.threads_per_worker=1", "runtime.parent_trains=true"],
    # several clients' LoRA in one forward pass (runtime/batched.py), K clients per pass
    "batched2": lambda t: ["runtime.transport=batched", "runtime.batch_clients=2"],
    "batched4": lambda t: ["runtime.transport=batched", "runtime.batch_clients=4"],
    "batched8": lambda t: ["runtime.transport=batched", "runtime.batch_clients=8"],
    # with a batched lever: the adapter kernel forced (auto: stacked on CUDA, segments on the CPU)
    "segments": lambda t: ["runtime.batch_kernel=segments"],
    "stacked": lambda t: ["runtime.batch_kernel=stacked"],
}


# -- memory of the process tree --------------------------------------------------------


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class TreeMemory(threading.Thread):
    """Peak summed PSS of this process and its descendants, sampled."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every, self.peak, self.running = every, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, sum(_pss_mb(p) for p in _tree(os.getpid())))
            time.sleep(self.every)


# -- one configuration (in a child process) ----------------------------------------------


def time_training() -> list[float]:
    """Wall seconds spent in every transport's ``exchange`` of ``train`` messages, summed
    into the returned one-element list as the run goes."""
    from fedfm.core.protocols import TRAIN
    from fedfm.runtime.batched import BatchedTransport
    from fedfm.runtime.concurrent import ProcessTransport
    from fedfm.runtime.transport import InProcessTransport

    total = [0.0]
    for cls in (InProcessTransport, ProcessTransport, BatchedTransport):
        def exchange(self, envelopes, timeout=None, _orig=cls.exchange):
            t0 = time.perf_counter()
            try:
                return _orig(self, envelopes, timeout)
            finally:
                if envelopes and envelopes[0].phase == TRAIN:
                    total[0] += time.perf_counter() - t0
        cls.exchange = exchange
    return total


def child(mode: str, config: str, threads: int, out: str, overrides: list[str]) -> None:
    import torch

    from fedfm.config import load_config
    from overhead import job_fedfm, job_plain

    torch.set_num_threads(threads)
    train_s = time_training() if mode != "plain" else None
    exp = load_config(config, [f"runtime.threads={threads}", "runtime.progress=false", *overrides])
    mem = TreeMemory()
    mem.start()
    t0 = time.perf_counter()
    result = (job_plain if mode == "plain" else job_fedfm)(exp)
    result["wall_s"] = time.perf_counter() - t0
    if train_s is not None:
        result["train_s"] = train_s[0]
    mem.running = False
    mem.join()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result["peak_pss_tree_mb"] = max(mem.peak, _pss_mb(os.getpid()))
    result["client_rounds"] = exp.rounds * (exp.federation.clients_per_round or exp.federation.clients)
    Path(out).write_text(json.dumps(result))


def start(mode: str, args, threads: int, overrides: list[str], cpus: list[int] | None = None):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--child", mode, "--config", args.config, "--threads", str(threads), "--result", out]
    cmd += [f"--override={o}" for o in overrides]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # the child and its workers
    return subprocess.Popen(cmd, preexec_fn=pin), out


def collect(out: str, status: int, usage, mode: str, overrides: list[str]) -> dict:
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not Path(out).exists() or not Path(out).stat().st_size:
        print(f"benchmark child {mode} {overrides} failed with exit code {code}", flush=True)
        return {"failed": code}
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # the child and the workers it reaped
    return result


def finish(proc, out: str, mode: str, overrides: list[str]) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    return collect(out, status, usage, mode, overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/quickstart.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--examples", type=int, help="federation.examples_per_client")
    ap.add_argument("--test-examples", type=int)
    ap.add_argument("--levers", default="processes,eval_unsorted,bf16,compile,bucket")
    ap.add_argument("--best", action="append", help="a combination of levers joined by '+' (repeatable)")
    ap.add_argument("--parallel", action="store_true",
                    help="run all configurations at once, each pinned to its own --threads cores (an idle many-core machine)")
    ap.add_argument("--override", "-o", action="append", default=[], help="dotted config override for every run")
    ap.add_argument("--child")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.config, args.threads, args.result, args.override)
        return
    base = list(args.override) + [f"runtime.device={args.device}"]
    for flag, key in (("rounds", "rounds"), ("clients", "federation.clients"),
                      ("examples", "federation.examples_per_client"), ("test_examples", "federation.test_examples")):
        if getattr(args, flag) is not None:
            base.append(f"{key}={getattr(args, flag)}")
    t = args.threads
    levers = [x for x in args.levers.split(",") if x]
    best = args.best or ["processes", "processes+bucket"]
    unknown = sorted({x for x in levers + [q for b in best for q in b.split("+")] if x not in LEVERS})
    if unknown:
        sys.exit(f"unknown lever(s) {unknown} in --levers/--best; known: {', '.join(LEVERS)}")
    cuda = args.device != "cpu"
    if cuda:  # CUDA cannot be used in forked workers; the plain loop of overhead.py is CPU only
        levers = [x for x in levers if x not in ("processes", "parent")]
        best = [b for b in best if "processes" not in b and "parent" not in b]
    plan: list[tuple[str, str, int, list[str]]] = []
    if not cuda:
        plan.append(("plain loop", "plain", t, base))
    plan.append(("fedfm sequential", "fedfm", t, base))
    if "processes" in levers or "parent" in levers:
        plan.append(("fedfm sequential, 1 thread", "fedfm", 1, base))
    for lever in levers:
        plan.append((lever, "fedfm", t, base + LEVERS[lever](t)))
    for combo in best:
        parts = combo.split("+")
        if len(parts) > 1:
            plan.append((combo, "fedfm", t, base + [o for p in parts for o in LEVERS[p](t)]))
    rows = []
    if args.parallel:  # every configuration at once, each pinned to its own --threads cores
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < len(plan) * t:
            raise SystemExit(f"--parallel needs {len(plan) * t} cores for {len(plan)} configurations, {len(cores)} here")
        started = [start(m, args, th, o, cores[i * t : (i + 1) * t]) for i, (_, m, th, o) in enumerate(plan)]
        by_pid = {p.pid: i for i, (p, _) in enumerate(started)}
        results: list[dict] = [{}] * len(plan)
        while by_pid:  # in the order they finish, each printed at once
            pid, status, usage = os.wait4(-1, 0)
            if pid not in by_pid:
                continue
            i = by_pid.pop(pid)
            label, m, _, o = plan[i]
            results[i] = collect(started[i][1], status, usage, m, o)
            print(f"finished: {label} {json.dumps(results[i])}", flush=True)
    else:
        results = [finish(*start(m, args, th, o), m, o) for _, m, th, o in plan]
    for (label, *_), r in zip(plan, results):
        r["label"] = label
        if "failed" in r:
            print(f"{label:>28}: FAILED (exit code {r['failed']})", flush=True)
            continue
        rows.append(r)
        print(f"{label:>28}: wall {r['wall_s']:.1f}s  train {r.get('train_s', float('nan')):.1f}s  cpu {r['cpu_s']:.1f}s  peak RSS {r['peak_rss_mb']:.0f} MB  "
              f"tree PSS {r['peak_pss_tree_mb']:.0f} MB  accuracy {r['accuracy']:.4f}  loss {r['loss']:.6f}", flush=True)
    ref = rows[0]
    print(f"\nratios against '{ref['label']}'; clients/s = client trainings per wall second (eval included); "
          "train clients/s = client trainings per second of the training phase\n")
    print("| configuration | wall (s) | train phase (s) | CPU (s) | peak RSS main (MB) | peak PSS tree (MB) | accuracy | loss "
          "| clients/s | train clients/s | wall ratio | PSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        train = f"{r['train_s']:.1f}" if "train_s" in r else "-"
        train_rate = f"{r['client_rounds'] / r['train_s']:.3f}" if r.get("train_s") else "-"
        print(f"| {r['label']} | {r['wall_s']:.1f} | {train} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_pss_tree_mb']:.0f} | "
              f"{r['accuracy']:.4f} | {r['loss']:.6f} | {r['client_rounds'] / r['wall_s']:.3f} | {train_rate} | "
              f"{r['wall_s'] / ref['wall_s']:.3f} | {r['peak_pss_tree_mb'] / ref['peak_pss_tree_mb']:.3f} |")
    seq = next((r for r in rows if r["label"] == "fedfm sequential"), None)
    for r in rows:
        if seq is not None and r is not seq and "train_s" in r and seq.get("train_s"):
            print(f"training phase {r['label']} / fedfm sequential: {r['train_s'] / seq['train_s']:.3f} "
                  f"(clients/s of the training phase: {seq['train_s'] / r['train_s']:.2f}x; whole run: {seq['wall_s'] / r['wall_s']:.2f}x)")
    seq1 = next((r for r in rows if r["label"] == "fedfm sequential, 1 thread"), None)
    proc = next((r for r in rows if r["label"] == "processes"), None)
    if seq1 and proc:
        same = (seq1["accuracy"], seq1["loss"]) == (proc["accuracy"], proc["loss"])
        print(f"\nprocesses == sequential at 1 thread (accuracy and loss to the last digit): {same}")


if __name__ == "__main__":
    main()
