"""A small learning-rate / eps sweep of the zeroth-order learners on the tiny job of
benchmarks/zeroth_order.py; writes the doc table between the ``zo-sweep`` markers of
docs/zeroth_order.md.

    PYTHONPATH=src nice -n 10 python benchmarks/zeroth_order_sweep.py --out runs/zo_sweep \
        [--methods mezo,fedkseed] [--lr 1e-4,1e-3,1e-2] [--eps 1e-3,1e-2] [--rounds 5] [--extra VARIANT=KEY:VALUE,...]

Each setting is the method's config of the tiny job (``zeroth_order.write_config``: its
``examples/`` file with the tiny random-init BERT and the toy sentiment CSV, 4 clients by
group, 40 test examples; MeZO: one client with all the data) with ``learner.lr`` and
``learner.eps`` replaced, run in this process (``LocalRuntime``, one torch thread) one
after the other; backprop LoRA's row is run the same way as the reference. The best
setting per method is the one with the lowest final test loss (the accuracy on 40
examples stays at the majority share, or flips to the other class when a run diverges).
``--extra fedkseed-pro=seed_sampling:score[,lr:0.01,eps:0.001]`` adds a variant of a
method (the part before ``-``) with more learner parameters, at the given lr and eps or
that method's best setting.
Results accumulate in OUT/sweep.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zeroth_order as zo  # noqa: E402

MARK = "zo-sweep"


def run_config(path: Path, run_dir: Path) -> dict:
    from fedfm.config import load_config
    from fedfm.runtime.local import LocalRuntime

    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    LocalRuntime(load_config(path), run_dir).run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"accuracy": [r.get("accuracy") for r in rows], "loss": [r.get("loss") for r in rows],
            "train_loss": [r.get("train_loss") for r in rows[1:]], "wall_s": time.perf_counter() - t0}


def setting(label: str, rounds: int, out: Path, learner: dict) -> Path:
    import yaml

    raw = yaml.safe_load(zo.write_config(label, rounds, out).read_text())
    raw.setdefault("learner", {}).update(learner)
    raw["runtime"]["threads"] = 1
    tag = "-".join(f"{k}{v}" for k, v in learner.items())
    path = out / f"{label}-{tag}.yaml" if learner else out / f"{label}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def best(results: list[dict], method: str) -> dict | None:
    """The setting with the lowest final test loss (accuracy on 40 examples stays at the
    majority share or flips to the other class when a run diverges)."""
    rows = [r for r in results if r["method"] == method]
    return min(rows, key=lambda r: r["loss"][-1]) if rows else None


def fmt(values: list, digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values if v is not None)


def table(results: list[dict]) -> str:
    lines = ["| method | lr | eps | final accuracy | test loss r0 -> final | train loss r1 -> final | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["method"] == "lora":
            continue
        lines.append(f"| {r['method']}{r.get('variant', '')} | {r['lr']:g} | {r['eps']:g} | {r['accuracy'][-1]:.3f} "
                     f"| {r['loss'][0]:.4f} -> {r['loss'][-1]:.4f} | {r['train_loss'][0]:.4f} -> {r['train_loss'][-1]:.4f} "
                     f"| {r['wall_s']:.0f} |")
    lines += ["", "| run | accuracy per round (r0, r1, ...) | test loss per round |", "|---|---|---|"]
    lora = next((r for r in results if r["method"] == "lora"), None)
    if lora is not None:
        lines.append(f"| lora (backprop, the tiny table's setting) | {fmt(lora['accuracy'])} | {fmt(lora['loss'], 4)} |")
    for method in dict.fromkeys(r["method"] for r in results if r["method"] != "lora"):
        b = best([r for r in results if not r.get("variant")], method)
        if b is not None:
            lines.append(f"| {method}, best: lr {b['lr']:g}, eps {b['eps']:g} | {fmt(b['accuracy'])} | {fmt(b['loss'], 4)} |")
    for r in results:
        if r.get("variant"):
            lines.append(f"| {r['method']}{r['variant']} (lr {r['lr']:g}, eps {r['eps']:g}) | {fmt(r['accuracy'])} "
                         f"| {fmt(r['loss'], 4)} |")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = zo.DOC.read_text()
    new = re.sub(rf"(<!-- {MARK}:start -->\n).*?(<!-- {MARK}:end -->)", lambda m: m.group(1) + text + "\n" + m.group(2),
                 doc, flags=re.S)
    zo.DOC.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=zo.ROOT / "runs" / "zo_sweep")
    ap.add_argument("--methods", default="mezo,fedkseed")
    ap.add_argument("--lr", default="1e-4,1e-3,1e-2")
    ap.add_argument("--eps", default="1e-3,1e-2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-lora", action="store_true", help="skip the backprop LoRA reference run")
    ap.add_argument("--extra", action="append", default=[], help="VARIANT=KEY:VALUE,..., e.g. fedkseed-pro=seed_sampling:score,lr:0.01,eps:0.001")
    ap.add_argument("--table", action="store_true", help="rewrite the doc table from OUT/sweep.jsonl only")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "sweep.jsonl"

    def record(res: dict) -> None:
        with open(log, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(json.dumps(res), flush=True)

    if not args.table:
        if not args.no_lora:
            record({"method": "lora", **run_config(setting("lora", args.rounds, args.out, {}), args.out / "lora")})
        for method in [m for m in args.methods.split(",") if m]:
            for lr in [float(x) for x in args.lr.split(",")]:
                for eps in [float(x) for x in args.eps.split(",")]:
                    path = setting(method, args.rounds, args.out, {"lr": lr, "eps": eps})
                    record({"method": method, "lr": lr, "eps": eps, **run_config(path, args.out / path.stem)})
        done = [json.loads(line) for line in log.read_text().splitlines()]
        for extra in args.extra:
            variant, _, kvs = extra.partition("=")
            method = variant.split("-")[0]
            learner = dict(kv.split(":", 1) for kv in kvs.split(","))
            b = best([r for r in done if not r.get("variant")], method)
            if b is None and not {"lr", "eps"} <= set(learner):
                raise SystemExit(f"--extra {extra}: no {method} setting in {log} to start from; give lr: and eps:")
            lr, eps = float(learner.pop("lr", b and b["lr"])), float(learner.pop("eps", b and b["eps"]))
            path = setting(method, args.rounds, args.out, {"lr": lr, "eps": eps, **learner})
            record({"method": method, "variant": variant[len(method):], "lr": lr, "eps": eps, **learner,
                    **run_config(path, args.out / path.stem)})
    latest: dict[tuple, dict] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        r = json.loads(line)
        latest[(r["method"], r.get("variant", ""), r.get("lr"), r.get("eps"))] = r
    text = table(list(latest.values()))
    print(text)
    write_doc(text)


if __name__ == "__main__":
    main()
