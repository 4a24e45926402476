"""Learning-rate sweep behind the FedPEFT table: the lr each examples/peft/ config records.

For every method, the learning rates ``lr x factor`` (``lr`` from its example config,
``--factors`` 1/3,1,3 by default, rounded to two significant digits) run on the full
quickstart job of benchmarks/peft_table.py: all 8 clients, 250 reviews each, 3 rounds,
evaluated on the 1,000 held-out reviews. (A one-round pass, ``-o rounds=1``, tells little
on this job: every method predicts the majority class after round 1.) The pick is the
highest accuracy after the last round, ties broken by the lower test loss. Each point is
saved as JSON under ``--out``, so an interrupted sweep resumes, and a later call with
other ``--factors`` adds points; ``--table-only`` reprints the table.

    PYTHONPATH=src python benchmarks/peft_lr_sweep.py                   # 33 runs, ~2 h
    PYTHONPATH=src python benchmarks/peft_lr_sweep.py --methods bitfit,ia3 --factors 0.1,10

The pick is chosen on the same held-out reviews the table reports, so the table's
accuracies are those of the best lr tried, not of an untouched test set. Copy a changed
pick into the method's example config by hand (`train.lr`), then rerun
benchmarks/peft_table.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_table import METHODS, ROOT, load_method, parse_methods  # noqa: E402


def lr_text(lr: float) -> str:
    """A decimal YAML float (YAML 1.1 reads ``1e-3`` as a string, which the strict config rejects)."""
    text = f"{lr:.10f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def run_point(name: str, lr: float, overrides: list[str], threads: int, out: Path) -> dict:
    from fedfm.runtime import LocalRuntime

    exp = load_method(name, overrides + [f"train.lr={lr_text(lr)}"], threads)
    run_dir = out / "runs" / f"{name}@{lr_text(lr)}"
    LocalRuntime(exp, run_dir, progress=False).run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    gc.collect()
    return {
        "method": name, "lr": float(lr_text(lr)), "overrides": overrides,
        "accuracy": [r["accuracy"] for r in evaluated], "loss": [r.get("loss") for r in evaluated],
    }


def pick(points: list[dict]) -> dict:
    """Highest final accuracy; among equal ones, the lowest final test loss."""
    return max(points, key=lambda p: (round(p["accuracy"][-1], 6), -(p["loss"][-1] or 0.0)))


def table(results: dict[str, list[dict]], example_lr: dict[str, float]) -> str:
    lines = [
        "| method | config lr | lr tried: final accuracy (test loss) | pick |",
        "|---|---:|---|---:|",
    ]
    for name in [m for m in METHODS if results.get(m)]:
        points = sorted(results[name], key=lambda p: p["lr"])
        best = pick(points)
        cells = ", ".join(
            f"{'**' if p is best else ''}{p['lr']:g}: {p['accuracy'][-1]:.3f} ({p['loss'][-1]:.3f}){'**' if p is best else ''}"
            for p in points
        )
        lines.append(f"| {name} | {example_lr[name]:g} | {cells} | {best['lr']:g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--factors", default="0.333333,1,3", help="multiples of each example config's lr")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "peft_lr_sweep")
    ap.add_argument("-o", "--override", action="append", default=[], help="dotted override for every run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="print the table of the saved points")
    args = ap.parse_args()
    names = parse_methods(args.methods)
    try:
        factors = [float(f) for f in args.factors.split(",")]
    except ValueError:
        raise SystemExit(f"--factors: expected numbers separated by commas, got {args.factors!r}") from None
    overrides = list(args.override)
    res_dir = args.out / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    example_lr = {name: load_method(name, overrides, args.threads).train.lr for name in names}
    if not args.table_only:
        for name in names:
            for lr in sorted({float(f"{example_lr[name] * f:.2g}") for f in factors}):
                path = res_dir / f"{name}@{lr_text(lr)}.json"
                if path.exists():
                    continue
                point = run_point(name, lr, overrides, args.threads, args.out)
                path.write_text(json.dumps(point, indent=1))
                print(f"{name} lr {lr:g}: accuracy {point['accuracy'][0]:.3f} -> {point['accuracy'][-1]:.3f}, "
                      f"loss {point['loss'][-1]:.4f}", flush=True)
    results: dict[str, list[dict]] = {}
    for path in sorted(res_dir.glob("*.json")):
        point = json.loads(path.read_text())
        if point["method"] in names and point["overrides"] == overrides:
            results.setdefault(point["method"], []).append(point)
    print(f"sweep job overrides: {' '.join(overrides) or 'none (the full quickstart job)'}")
    print(table(results, example_lr))


if __name__ == "__main__":
    main()
