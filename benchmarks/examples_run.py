"""Run every example config end to end and print one line per example.

    PYTHONPATH=src python benchmarks/examples_run.py                 # reduced: 1 round, 16 examples per client, 2 local steps
    PYTHONPATH=src python benchmarks/examples_run.py --full          # each example exactly as written
    PYTHONPATH=src python benchmarks/examples_run.py --only 'robustness/*' --only quickstart.yaml
    PYTHONPATH=src python benchmarks/examples_run.py --skip 'llm/*' --jobs 6 -o runtime.threads=2

An example whose header says to prepare something first (a commented ``python -m
fedfm.data.builders ...`` command, as in examples/llm/, or ``python -m fedfm.attacks.plant
...``, examples/robustness/compromised_base.yaml) has that command run once before it,
unless its ``--out`` file exists. Examples that need a Debian package (fortunes) say so in
their header and fail with the package's name when it is missing.

Examples whose keys come from the environment (``key_env``: FEDFM_WATERMARK_KEY,
FEDFM_CLIENT_MASTER_KEY) get a fixed demonstration key when the variable is unset.
Deployment-mode examples (``runtime.flower.mode: deployment``) need a SuperLink and
SuperNodes (docs/distributed.md) and are listed as skipped.

Each example runs in its own `fedfm run` process (its own peak memory, a crash is one
failed row, not a stopped script) into a temporary directory. The reduced mode only
shortens the job (rounds, examples per client, test examples, training steps, a server
step's ``max_steps``: at most 20); every other key,
the technique included, is the example's own (``REDUCED_FOR``: the keys a few techniques tie
to the number of rounds, set to fit the reduced run). Prints: example, status, wall seconds,
the last round's accuracy (or perplexity) and bytes up, and the error's last line.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REDUCED = [
    "rounds=1",
    "federation.examples_per_client=16",
    "federation.test_examples=64",
    "train.steps=2",
]
# Examples whose technique ties other keys to the number of rounds: the reduced run sets
# them to fit one round (or the fewest rounds the technique needs).
REDUCED_FOR = {
    "adaptability/dapt_fedbfpt.yaml": ["learner.rounds=1"],  # the layer schedule spreads over learner.rounds
    "adaptability/update_clusters.yaml": ["rounds=2", "learner.warmup_rounds=1"],  # needs warmup_rounds < rounds
    "compression/flash.yaml": ["rounds=2"],  # round 1 is FLASH's discovery round, which keeps nothing
    "compression/flash_hetero.yaml": ["rounds=2"],
    "compression/prunefl.yaml": ["rounds=2", "learner.reconfigure_until=1"],  # needs reconfigure_until < rounds
}


REDUCED_SERVER_STEPS = 20  # a server step's max_steps (watermark embedding) in the reduced run


def reduced_server_steps(example: Path) -> list[str]:
    """``server_steps.I.max_steps=20`` for every server step of the example with more steps."""
    raw = yaml.safe_load(example.read_text()) or {}
    steps = raw.get("server_steps") if isinstance(raw, dict) else None
    return [f"server_steps.{i}.max_steps={REDUCED_SERVER_STEPS}" for i, step in enumerate(steps or [])
            if isinstance(step, dict) and step.get("max_steps", 0) > REDUCED_SERVER_STEPS]


def last_row(out: Path) -> dict:
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[-1] if rows else {}


PREPARE = ("python -m fedfm.data.builders", "python -m fedfm.attacks.plant")


def build_commands(example: Path) -> list[list[str]]:
    """The preparation commands in the example's header comment: ``python -m
    fedfm.data.builders ...`` (data files) and ``python -m fedfm.attacks.plant ...`` (a
    compromised base model)."""
    commands, current = [], None
    for line in example.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        start = min((text.find(p) for p in PREPARE if p in text), default=-1)
        if current is None and start >= 0:
            current = text[start:]
        elif current is not None:
            current += " " + text
        else:
            continue
        if not current.endswith("\\"):
            commands.append(current.split())
            current = None
        else:
            current = current[:-1].strip()
    return commands


def build_data(example: Path) -> str:
    for words in build_commands(example):
        target = words[words.index("--out") + 1] if "--out" in words else None
        if target and (ROOT / target).exists():
            continue
        proc = subprocess.run([sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"data build failed: {' '.join(words)}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return ""


DEMO_KEYS = {"FEDFM_WATERMARK_KEY": "examples-run-owner-key", "FEDFM_CLIENT_MASTER_KEY": "examples-run-master-key"}


def needs_deployment(example: Path) -> bool:
    runtime = (yaml.safe_load(example.read_text()) or {}).get("runtime") or {}
    return runtime.get("backend") == "flower" and (runtime.get("flower") or {}).get("mode") == "deployment"


def last_stage(example: Path) -> str:
    """The last stage's folder name of a stages file (fedfm.stages), else ''."""
    raw = yaml.safe_load(example.read_text()) or {}
    stages = raw.get("stages") if isinstance(raw, dict) else None
    return stages[-1].get("name", "") if isinstance(stages, list) and stages and isinstance(stages[-1], dict) else ""


def error_line(log: str) -> str:
    """The last line of a failed run's output that says why (``error: ...`` or a Python
    exception), else its last line."""
    lines = [line.strip() for line in log.strip().splitlines()] or ["(no output)"]
    said = [line for line in lines if line.lower().startswith("error") or line.split(":")[0].endswith(("Error", "Exception"))]
    return (said or lines)[-1][:160]


def run_one(example: Path, full: bool, timeout: float, extra: list[str] | None = None) -> dict:
    name = str(example.relative_to(ROOT / "examples"))
    if needs_deployment(example):
        return {"example": name, "ok": True, "skipped": True, "wall_s": 0.0, "metric": None, "bytes_up": None,
                "error": "deployment mode: needs a SuperLink and SuperNodes (docs/distributed.md)"}
    problem = build_data(example)
    if problem:
        return {"example": name, "ok": False, "wall_s": 0.0, "metric": None, "bytes_up": None, "error": problem}
    env = {**DEMO_KEYS, **os.environ, "COLUMNS": "1000"}  # one line per message
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedfm", "run", str(example), "--out", str(out), "--no-progress"]
        for o in ([] if full else REDUCED + REDUCED_FOR.get(name, []) + reduced_server_steps(example)) + list(extra or []):
            cmd += ["-o", o]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
            code, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            code, log = -1, f"timed out after {timeout:.0f} s"
        wall = time.perf_counter() - start
        row = last_row(out) or last_row(out / last_stage(example))
    error = "" if code == 0 else error_line(log)
    metric = row.get("accuracy", row.get("perplexity"))
    return {"example": name, "ok": code == 0, "wall_s": round(wall, 1),
            "metric": metric, "bytes_up": row.get("bytes_up"), "error": error}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="run each example unchanged (slow)")
    ap.add_argument("--only", action="append", help="glob on the path under examples/, e.g. 'robustness/*' (repeatable)")
    ap.add_argument("--skip", action="append", default=[], help="glob of examples to leave out (repeatable)")
    ap.add_argument("--jobs", type=int, default=1, help="examples run at once, each in its own process")
    ap.add_argument("-o", "--override", action="append", default=[], help="extra dotted override for every example")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per example")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    args = ap.parse_args()
    examples = [p for p in sorted((ROOT / "examples").rglob("*.yaml"))
                if any(fnmatch.fnmatch(str(p.relative_to(ROOT / "examples")), g) for g in args.only or ["*"])
                and not any(fnmatch.fnmatch(str(p.relative_to(ROOT / "examples")), g) for g in args.skip)]
    for example in examples:  # data builds once, before any example runs
        build_data(example)
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, example, args.full, args.timeout, args.override) for example in examples]
        for future in as_completed(futures):
            r = future.result()
            rows.append(r)
            status = "skip" if r.get("skipped") else "ok  " if r["ok"] else "FAIL"
            print(f"{status} {r['example']:<46} {r['wall_s']:>7.1f}s  metric={r['metric']}  up={r['bytes_up']}  {r['error']}", flush=True)
    rows.sort(key=lambda r: r["example"])
    failed = [r["example"] for r in rows if not r["ok"]]
    skipped = [r["example"] for r in rows if r.get("skipped")]
    print(f"{len(rows) - len(failed) - len(skipped)}/{len(rows)} examples ran" + (f"; skipped: {', '.join(skipped)}" if skipped else "")
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
