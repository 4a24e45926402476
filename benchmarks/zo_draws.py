"""Zeroth-order directions: portable float64 draws against torch's native float32 draw,
in full-parameter MeZO (``learner.draws``, ``learners/mezo.py``).

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/zo_draws.py [--steps 10] [--repeats 2] [--job minilm|smollm2|tiny]

One process, torch threads 2. For each job it builds the model once (``Workbench``) and
runs one client's MeZO round of ``--steps`` steps with every trainable parameter tuned
(``peft: full``), alternating ``draws: portable`` and ``draws: native`` ``--repeats`` times
each; a round is three direction draws the size of the model per step (+eps z, -eps z and
the update) and two forward passes. It prints, per mode, the median wall time per step,
the time of the draws alone (one draw of every trainable parameter, median of 5), and the
round's train loss; then the ratio native / portable. The two modes train along
different directions (other numbers), so their losses differ by chance, not by quality.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "minilm": (ROOT / "examples" / "zeroth_order" / "mezo.yaml", []),
    "smollm2": (ROOT / "examples" / "zeroth_order" / "fedmezo_smollm2.yaml", ["federation.clients=1"]),
    "tiny": (ROOT / "examples" / "zeroth_order" / "mezo.yaml", [
        "model.init=random",
        "model.config_overrides={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, "
        "max_position_embeddings: 128}",
        "data.source=file", f"data.path={ROOT / 'runs' / 'zo-draws-toy.csv'}", "data.group_column=group",
        "data.max_length=16", "federation.examples_per_client=80", "federation.test_examples=40",
    ]),
}


def draw_seconds(params: dict, portable: bool) -> float:
    from fedfm.aggregators.zo_replay import param_noise

    times = []
    for rep in range(5):
        t0 = time.perf_counter()
        for i, (_, p) in enumerate(sorted(params.items())):
            param_noise(p.shape, rep, i, portable)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="minilm", choices=sorted(JOBS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from fedfm.config import load_config
    from fedfm.core.types import Instruction
    from fedfm.learners import build_learner
    from fedfm.runtime.workbench import Workbench

    path, over = JOBS[args.job]
    if args.job == "tiny":
        import sys

        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_toy_csv

        (ROOT / "runs").mkdir(exist_ok=True)
        make_toy_csv(ROOT / "runs" / "zo-draws-toy.csv")
    over = over + ["peft={method: full}", f"learner.steps={args.steps}", "learner.name=mezo"]
    benches = {mode: Workbench(load_config(path, over + [f"learner.draws={mode}"])) for mode in ("portable", "native")}
    base = benches["portable"]
    params = {n: p for n, p in base.model.named_parameters() if p.requires_grad}
    size = sum(p.numel() for p in params.values())
    print(f"job {args.job}: {size:,} trainable parameters, {args.steps} steps per round, threads 2")
    walls: dict[str, list[float]] = {"portable": [], "native": []}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):
        for mode, bench in benches.items():
            learner = build_learner(bench.exp.learner)
            inst = Instruction(round=1, cid=0, state=bench.initial_state())
            ctx = bench.context(0, 1)  # the client's examples are encoded here, outside the timing
            t0 = time.perf_counter()
            update = learner.local_update(inst, ctx)
            walls[mode].append((time.perf_counter() - t0) / args.steps)
            losses[mode] = update.metrics["train_loss"]
    draws = {mode: draw_seconds(params, mode == "portable") for mode in walls}
    print("| draws | s / step (median) | s per draw of all parameters | train loss |")
    print("|---|---:|---:|---:|")
    for mode in walls:
        print(f"| {mode} | {statistics.median(walls[mode]):.3f} | {draws[mode]:.3f} | {losses[mode]:.4f} |")
    step = statistics.median(walls["native"]) / statistics.median(walls["portable"])
    print(f"native / portable: {step:.2f}x the time per step, {draws['native'] / draws['portable']:.2f}x per draw")


if __name__ == "__main__":
    main()
