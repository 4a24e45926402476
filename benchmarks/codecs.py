"""Codec sweep on the quickstart job: final accuracy vs bytes on the wire.

Runs examples/quickstart.yaml once per uplink codec chain (none, fp16, int8, int4,
top-10% + error feedback, top-1% + error feedback, top-10% + int4), each in its own
run directory (a finished run is reused, so the sweep can be resumed or split), and
prints a Markdown table: final accuracy, uplink bytes per client per round, and the
ratio to uncompressed LoRA and to full fine-tuning. Full fine-tuning's bytes per client
per round are exact: the safetensors size of MiniLM's full trainable State (no training).
Plots accuracy vs cumulative uplink bytes per client to a PNG.

    PYTHONPATH=src python benchmarks/codecs.py [--only none,int4] [--out runs/bench_codecs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "quickstart.yaml"

# label -> (description, uplink chain)
SWEEP: dict[str, tuple[str, list[dict]]] = {
    "none": ("uncompressed LoRA (fp32)", []),
    "fp16": ("fp16 cast", [{"fp16": True}, {"compact": True}]),
    "int8": ("int8 stochastic, block 64", [{"quantize": 8, "block": 64}, {"compact": True}]),
    "int4": ("int4 stochastic, block 64", [{"quantize": 4, "block": 64}, {"compact": True}]),
    "top10_ef": ("top-10% + EF", [{"topk": 0.1, "error_feedback": True}, {"compact": True}]),
    "top1_ef": ("top-1% + EF", [{"topk": 0.01, "error_feedback": True}, {"compact": True}]),
    "top10_int4": (
        "top-10% + EF + int4",
        [{"topk": 0.1, "error_feedback": True}, {"quantize": 4, "block": 64}, {"compact": True}],
    ),
    "rand10_int4": (
        "random-10% + EF + int4 (no indices sent)",
        [{"randk": 0.1, "error_feedback": True}, {"quantize": 4}, {"compact": True}],
    ),
}


def run_one(label: str, out: Path, threads: int) -> Path:
    """Run one configuration in a fresh process (so every run uses the current code)."""
    run_dir = out / label
    if (run_dir / "summary.json").exists():
        return run_dir
    chain = json.dumps(SWEEP[label][1])
    code = (
        "import json,sys; from fedfm.config import load_config; from fedfm.runtime import run_local;"
        f"exp = load_config({str(CONFIG)!r}, ['codecs.up={chain}', 'runtime.threads={threads}', 'runtime.progress=false', 'name=codecs-{label}']);"
        f"print(json.dumps(run_local(exp, {str(run_dir)!r}, progress=False)))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return run_dir


def quickstart_state(peft: str | None = None) -> dict:
    """The State the quickstart shares (LoRA), or the full model's with ``peft="{method: full}"``."""
    from fedfm.config import load_config
    from fedfm.peft import apply_tuner, get_state
    from fedfm.tasks import build_task

    exp = load_config(CONFIG, [f"peft={peft}"] if peft else [])
    model, _ = build_task(exp.model.task).build(exp.model, exp.seed)
    return get_state(apply_tuner(model, exp.peft, exp.model.task))


def full_finetuning_bytes() -> int:
    """Exact safetensors size of MiniLM's full State (every parameter, as the full tuner shares it)."""
    from fedfm.codecs import Payload, to_bytes

    return len(to_bytes(Payload(quickstart_state("{method: full}"), {"cid": "0", "num_examples": "250"})))


def bytes_without_training(labels: list[str]) -> dict[str, int]:
    """Bytes of one client's encoded update, for an update with the quickstart LoRA State's
    names and shapes and Gaussian values (no training). Exact for none, fp16, int8, int4 and
    random-k, whose sizes depend on shapes only; for top-k the index widths depend on where
    the largest entries fall, so a trained update may differ by a few bytes per tensor."""
    import tempfile

    import torch

    from fedfm.codecs import CodecChain, CodecContext
    from fedfm.runtime.store import ClientStore

    state = quickstart_state()
    g = torch.Generator().manual_seed(0)
    update = {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in labels:
            chain = CodecChain.from_specs(SWEEP[label][1], "codecs.up")
            ctx = CodecContext("up", 1, 0, state, seed=0, store=ClientStore(tmp))
            out[label] = chain.encode(update, {"cid": "0", "num_examples": "250"}, ctx).nbytes
    return out


def load_rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def summarize(label: str, run_dir: Path) -> dict:
    rows = load_rows(run_dir)
    rounds = [r for r in rows if r["round"] > 0]
    n_client_rounds = sum(len(r["clients"]) for r in rounds)
    up = sum(r["bytes_up"] for r in rounds)
    down = sum(r["bytes_down"] for r in rounds)
    return {
        "label": label,
        "chain": SWEEP[label][0],
        "accuracy": rows[-1]["accuracy"],
        "rounds": rows[-1]["round"],
        "by_round": {r["round"]: r["accuracy"] for r in rows if "accuracy" in r},
        "up_per_client_round": up / n_client_rounds,
        "down_per_client_round": down / n_client_rounds,
        "curve": [(0, rows[0]["accuracy"])]
        + [
            (sum(x["bytes_up"] / len(x["clients"]) for x in rounds[: i + 1]), r["accuracy"])
            for i, r in enumerate(rounds)
            if "accuracy" in r
        ],
    }


def table(results: list[dict], lora_bytes: float, full_bytes: int) -> str:
    lines = [
        "| config | uplink chain | rounds | accuracy | uplink B / client / round | x smaller than LoRA fp32 | fraction of full FT |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        b = r["up_per_client_round"]
        lines.append(
            f"| {r['label']} | {r['chain']} | {r['rounds']} | {r['accuracy']:.4f} | {b:,.0f} | {lora_bytes / b:.1f} | {b / full_bytes:.2e} |"
        )
    lines.append(f"| full FT | full State fp32 (size only, not trained) | | | {full_bytes:,} | {lora_bytes / full_bytes:.4f} | 1 |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in results:
        xs, ys = zip(*r["curve"][1:])  # rounds 1.. (round 0 sent nothing: a dashed line)
        ax.plot(xs, ys, marker="o", label=r["label"])
    if results:
        ax.axhline(results[0]["curve"][0][1], color="grey", ls="--", lw=1, label="before training")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes per client (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title("quickstart (MiniLM + LoRA r=8, 8 clients, 3 rounds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SWEEP), help="comma-separated labels to run")
    ap.add_argument("--out", default="runs/bench_codecs", type=Path)
    ap.add_argument("--threads", default=2, type=int)
    ap.add_argument("--no-run", action="store_true", help="only summarize finished runs; skip the others")
    ap.add_argument("--partial", action="store_true", help="with --no-run: also list unfinished runs (rounds done so far)")
    ap.add_argument("--bytes-only", action="store_true", help="encode one Gaussian update per config, no training")
    ap.add_argument("--plot", default=ROOT / "docs" / "compression_accuracy_vs_bytes.png", type=Path)
    args = ap.parse_args()
    labels = [l for l in args.only.split(",") if l]
    unknown = [l for l in labels if l not in SWEEP]
    if unknown:
        raise SystemExit(f"--only: unknown labels {unknown}; known: {list(SWEEP)}")
    if args.bytes_only:
        sizes = bytes_without_training(labels)
        full = full_finetuning_bytes()
        print("| config | uplink chain | B / client / round | x smaller than LoRA fp32 | fraction of full FT |")
        print("|---|---|---:|---:|---:|")
        for l, b in sizes.items():
            print(f"| {l} | {SWEEP[l][0]} | {b:,} | {sizes.get('none', float('nan')) / b:.1f} | {b / full:.2e} |")
        print(f"| full FT | full State fp32 | {full:,} | | 1 |")
        return
    if args.no_run:
        def ready(l: str) -> bool:
            if (args.out / l / "summary.json").exists():
                return True
            return args.partial and (args.out / l / "metrics.jsonl").exists() and len(load_rows(args.out / l)) > 1
        labels = [l for l in labels if ready(l)]
        results = [summarize(l, args.out / l) for l in labels]
    else:
        results = [summarize(l, run_one(l, args.out, args.threads)) for l in labels]
    done = {r["label"]: r for r in results}
    base = done.get("none") or (summarize("none", args.out / "none") if (args.out / "none" / "summary.json").exists() else None)
    lora_bytes = base["up_per_client_round"] if base else float("nan")
    full = full_finetuning_bytes()
    print(table(results, lora_bytes, full))
    if base:
        for r in results:
            same = base["by_round"].get(r["rounds"], float("nan"))
            print(f"{r['label']}: {r['accuracy'] - same:+.4f} accuracy vs none at round {r['rounds']}; down {r['down_per_client_round']:,.0f} B/client/round")
    plot(results, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
