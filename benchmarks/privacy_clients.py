"""Client-level DP on the quickstart's 2,000 reviews split among more clients per round;
DP-SGD on the quickstart at other learning rates.

    PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/privacy_clients.py [--clients 8,32,64]
        [--epsilon 8] [--write-doc]
    PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/privacy_clients.py --dp-sgd-lr 1e-3,1e-2,3e-2
        [--epsilon 8] [--write-doc]

The quickstart (examples/quickstart.yaml: MiniLM, LoRA r=8 on query/value, 3 rounds, all
clients every round) with ``federation.clients`` n and ``examples_per_client`` 2000 / n,
so every row trains on the same number of reviews in all; each n without DP and with
client-level DP-FedAvg (``dp_clip`` 0.5, ``dp_noise`` at ``--epsilon``, δ = 1e-5, RDP:
the noise multiplier σ is solved for 3 rounds of n of n clients). The noise on the mean
update has std σ C / n per coordinate, so at the same ε more clients per round mean
proportionally less noise: the column "noise std on the mean". Columns: accuracy on the
1,000-review test set after the last round, ε spent, σ, that std, and wall seconds (one
torch thread). With more clients each takes fewer local steps a round (2000 / n reviews,
batches of 16); ``--same-steps`` gives every client n / 8 epochs, the quickstart's 16
steps a round (and n / 8 times its compute); ``--rows FILE`` adds earlier rows (the JSON
lines this script prints) to the table. ``--write-doc`` replaces the block ``dp-clients`` of docs/privacy.md.

``--dp-sgd-lr``: the quickstart as written (8 clients) with the learner ``dp_sgd``
(per-example clip C = 1, Poisson batches of 16), σ solved as ``privacy.py --full`` solves
it (the largest any client needs for ``--epsilon`` over its steps of the run, δ = 1e-5),
and AdamW at each learning rate instead of the quickstart's 3e-3; block ``dp-sgd-lr``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from privacy_tables import write_block  # noqa: E402

from fedfm.config import from_dict  # noqa: E402
from fedfm.learners.loop import planned_steps  # noqa: E402
from fedfm.privacy.accounting import Plan, solve_noise_multiplier  # noqa: E402
from fedfm.runtime import LocalRuntime  # noqa: E402
from fedfm.runtime.outputs import read_metrics  # noqa: E402

CLIP, DELTA, TOTAL = 0.5, 1e-5, 2000


def one(n: int, epsilon: float | None, out: Path, same_steps: bool = False) -> dict:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    raw["federation"].update(clients=n, examples_per_client=TOTAL // n)
    if same_steps:  # every client takes the quickstart's local steps a round: n / 8 epochs of 2000 / n reviews
        raw["train"]["epochs"] = max(1, n // 8)
    raw["runtime"] = {"progress": False, "threads": 1}
    if epsilon is not None:
        raw["server_steps"] = [{"name": "dp_clip", "clip_norm": CLIP},
                               {"name": "dp_noise", "target_epsilon": epsilon, "delta": DELTA}]
    t0 = time.perf_counter()
    LocalRuntime(from_dict(raw), out, overwrite=True).run()
    last = read_metrics(out / "metrics.jsonl")[-1]
    sigma = last.get("dp_noise.accounted_noise_multiplier")
    return {"n": n, "per_client": TOTAL // n, "epochs": raw["train"]["epochs"], "epsilon": epsilon, "accuracy": last["accuracy"],
            "spent": last.get("dp_noise.epsilon"), "sigma": sigma, "std": None if sigma is None else sigma * CLIP / n,
            "wall_s": time.perf_counter() - t0}


def dp_sgd_one(lr: float, epsilon: float, out: Path) -> dict:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    raw["runtime"] = {"progress": False, "threads": 1}
    raw["train"]["lr"] = lr
    exp = from_dict(raw)
    sizes = [exp.federation.examples_per_client] * exp.federation.clients
    batch = exp.train.batch_size
    sigma = max(solve_noise_multiplier(Plan(n, batch, "poisson"), exp.rounds * planned_steps(n, exp.train), epsilon, DELTA)
                for n in sizes)
    raw["learner"] = {"name": "dp_sgd", "clip_norm": 1.0, "noise_multiplier": sigma}
    raw["server_steps"] = [{"name": "dp_sgd_accountant", "delta": DELTA}]
    t0 = time.perf_counter()
    LocalRuntime(from_dict(raw), out, overwrite=True).run()
    last = read_metrics(out / "metrics.jsonl")[-1]
    return {"lr": lr, "epsilon": epsilon, "sigma": sigma, "accuracy": last["accuracy"],
            "spent": last.get("dp_sgd_accountant.epsilon_worst"), "wall_s": time.perf_counter() - t0}


def dp_sgd_table(rows: list[dict]) -> str:
    lines = ["| AdamW lr | target ε | σ | accuracy | ε spent (worst client) | wall s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['lr']:g} | {r['epsilon']:g} | {r['sigma']:.3f} | {r['accuracy']:.3f} | {r['spent']:.2f} | {r['wall_s']:.0f} |"
              for r in rows]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| clients n (every round) | reviews each | local epochs | setting | accuracy | ε spent | σ | noise std on the mean "
             "| wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["epsilon"] is None:
            setting, spent, sigma, std = "no DP", "-", "-", "-"
        else:
            setting = f"client-level DP, ε = {r['epsilon']:g}"
            spent, sigma, std = f"{r['spent']:.2f}", f"{r['sigma']:.3f}", f"{r['std']:.4f}"
        lines.append(f"| {r['n']} | {r['per_client']} | {r.get('epochs', 1)} | {setting} | {r['accuracy']:.3f} | {spent} | {sigma} | {std} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="8,32,64")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--no-plain", action="store_true", help="skip the runs without DP")
    ap.add_argument("--same-steps", action="store_true",
                    help="n / 8 local epochs, so every client takes the quickstart's local steps per round")
    ap.add_argument("--rows", type=Path, default=None, help="also put these earlier rows (JSON lines) in the table")
    ap.add_argument("--dp-sgd-lr", default="", help="instead: DP-SGD on the quickstart at these AdamW learning rates")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    if args.dp_sgd_lr:
        with tempfile.TemporaryDirectory() as tmp:
            for lr in [float(x) for x in args.dp_sgd_lr.split(",")]:
                rows.append(dp_sgd_one(lr, args.epsilon, Path(tmp) / f"lr{lr:g}"))
                print(rows[-1], flush=True)
        text = dp_sgd_table(rows)
        print(text)
        if args.write_doc:
            write_block("dp-sgd-lr", text)
        return
    if args.rows is not None:
        rows += [json.loads(x) for x in args.rows.read_text().splitlines() if x.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.clients.split(",")]:
            for eps in ([] if args.no_plain else [None]) + [args.epsilon]:
                rows.append(one(n, eps, Path(tmp) / f"n{n}_{eps}", args.same_steps))
                print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    if args.write_doc:
        write_block("dp-clients", text)


if __name__ == "__main__":
    main()
