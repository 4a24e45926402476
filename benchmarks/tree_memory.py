"""Peak memory of a fedfm run's process tree (the run and its worker processes).

Starts ``fedfm run CONFIG`` (with ``-o`` overrides) in a subprocess and samples every
process of its tree every 0.25 s from ``/proc/PID/smaps_rollup``: the tree's summed
proportional set size (PSS: copy-on-write pages shared by the workers counted once), and,
at the sample where that sum peaked, each process's PSS and private dirty memory. Prints
those and the wall time. Environment variables given with ``--env`` (e.g. glibc's
``MALLOC_MMAP_THRESHOLD_=131072``) are set for the run only.

    PYTHONPATH=src python benchmarks/tree_memory.py examples/speed/unpadded.yaml -o rounds=1 [--env NAME=VALUE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import _tree  # noqa: E402  (the same process-tree walk as speed.py)


def _rollup(pid: int) -> tuple[float, float]:
    """(PSS, private dirty) of one process in MB; zeros if it is gone."""
    pss = dirty = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Private_Dirty:"):
                    dirty = int(line.split()[1])
    except OSError:
        pass
    return pss / 1024.0, dirty / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("-o", dest="overrides", action="append", default=[])
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the run's environment")
    args = ap.parse_args()
    env = dict(os.environ, **dict(e.split("=", 1) for e in args.env))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedfm", "run", args.config, "--out", str(Path(tmp) / "run"), "--no-progress"]
        cmd += [x for o in args.overrides for x in ("-o", o)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak, at_peak = 0.0, []
        while proc.poll() is None:
            sample = [(pid, *_rollup(pid)) for pid in _tree(proc.pid)]
            total = sum(s[1] for s in sample)
            if total > peak:
                peak, at_peak = total, sample
            time.sleep(0.25)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"the run failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    print(f"{args.config} {' '.join(args.overrides)} {' '.join(args.env)}".strip())
    print(f"wall {wall:.1f} s; peak PSS of the tree {peak:.0f} MB")
    for pid, pss, dirty in at_peak:
        print(f"  process {pid}: PSS {pss:.0f} MB, private dirty {dirty:.0f} MB")


if __name__ == "__main__":
    main()
