"""Model pruning (PruneFL, FLASH) against dense fine-tuning of the same weights: accuracy,
density, bytes per client and round, wall time.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/pruning.py [--out runs/bench_pruning]
        [--only dense,prunefl] [--reduced] [--table] [-o KEY=VALUE ...]

Rows (each a run of ``examples/compression/prunefl.yaml`` or ``flash.yaml`` with overrides,
in this process, one after the other, torch threads 2):

- ``dense``: the same job with learner ``local`` and no codec: every weight the pruned
  runs may cut is trained and sent, fp32 (the baseline);
- ``prunefl``: the example as it is (no initial pruning; rounds 1 and 2 reconfigure);
- ``prunefl_init30``: 30% of each encoder weight kept by magnitude before round 1, then
  the same reconfigurations;
- ``prunefl_100mbit``: the example with a 10x faster link in PruneFL's time model
  (``per_value_s`` 3.2e-7: 4 bytes at 100 Mbit/s), which makes kept entries cheaper;
- ``flash``: ``examples/compression/flash.yaml`` as it is (density 0.5, the fixed mask
  keeps each weight's largest entries; 4 rounds, the first the discovery round, so 3 of
  training like the others);
- ``flash_random``: the same with FLASH's own random pick (SPDST);
- ``flash_jmwst``: ``flash.yaml`` with ``variant: jmwst`` (the clients prune and regrow in
  every training round, the server re-picks the mask from the aggregate);
  ``flash_jmwst_rate10``: the same pruning and regrowing 10% of the kept entries per update
  instead of half;
- ``flash_constant``: ``flash.yaml`` with the prune rate held at 0.5 at the discovery
  update instead of FLASH's cosine annealing (0.20 at the update after step 8 of 16);
- ``flash_hetero``: ``examples/compression/flash_hetero.yaml`` (Hetero-FLASH: 2 clients
  train half of the server's mask, 3 three quarters, 3 all of it).

``--reduced`` runs the tests' tiny random-init BERT on their toy CSV instead (seconds).
Results accumulate in OUT/results.jsonl (one line per finished run); ``--table`` prints the
Markdown table from it without running. Bytes are the loop's own counts (``len()`` of what
travelled), averaged over clients and rounds 1..R; the density is the share of prunable
entries kept after each round (``prunefl.density``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "compression"
ROWS = {
    "dense": ["learner={name: local}", "codecs.up=[]", "codecs.down=[]"],
    "prunefl": [],
    "prunefl_init30": ["learner.initial_density=0.3"],
    "prunefl_100mbit": ["learner.per_value_s=3.2e-7"],
    "flash": [],
    "flash_random": ["learner.pick=random"],
    "flash_jmwst": ["learner.variant=jmwst"],
    "flash_jmwst_rate10": ["learner.variant=jmwst", "learner.prune_rate=0.1"],
    "flash_constant": ["learner.prune_rate_decay=constant"],
    "flash_hetero": [],
}
FILES = {"flash_hetero": "flash_hetero.yaml"}  # rows of another example than their family's
TOY_CSV = ROOT / "runs" / "pruning-toy.csv"
REDUCED = [
    "model.init=random",
    "model.config_overrides={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 128}",
    "data.source=file", f"data.path={TOY_CSV}", "data.group_column=group", "data.max_length=16",
    "federation.clients=4", "federation.examples_per_client=40", "federation.test_examples=80",
    "train.lr=0.01", "train.batch_size=8",
    "train.epochs=2",
]
REDUCED_PRUNEFL = ["learner.fixed_s=1.0", "learner.per_value_s=1e-4"]
REDUCED_HETERO = ["federation.roles=[{name: small, count: 1, profile: {capacity: 0.5}}, "
                  "{name: medium, count: 1, profile: {capacity: 0.75}}]"]  # 4 clients


def run_row(name: str, overrides: list[str], out: Path, reduced: bool = False) -> dict:
    from fedfm.config import load_config
    from fedfm.runtime import LocalRuntime

    over = list(ROWS[name]) + overrides
    if reduced and name.startswith("prunefl"):
        over += REDUCED_PRUNEFL
    if reduced and name == "flash_hetero":
        over += REDUCED_HETERO
    file = FILES.get(name, "flash.yaml" if name.startswith("flash") else "prunefl.yaml")
    exp = load_config(EXAMPLES / file, over)
    t0 = time.perf_counter()
    LocalRuntime(exp, out / "runs" / name, progress=False, overwrite=True).run()  # the benchmark's own folder
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] >= 1 and r["clients"]]
    return {
        "row": name, "overrides": over, "wall_s": wall,
        "accuracy": [r.get("accuracy") for r in rows], "loss": [r.get("loss") for r in rows],
        "density": [r.get("prunefl.density", r.get("flash.density")) for r in rows],
        "up_per_client_round": sum(r["bytes_up"] / len(r["clients"]) for r in trained) / len(trained),
        "down_per_client_round": sum(r["bytes_down"] / len(r["clients"]) for r in trained) / len(trained),
        "up_by_round": [r["bytes_up"] / len(r["clients"]) for r in trained],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def fmt(values: list, spec: str) -> str:
    return ", ".join("-" if v is None else format(v, spec) for v in values)


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["row"] == "dense"), None)
    lines = ["| row | accuracy by round | test loss by round | density after each round | up B / client / round "
             "(by round) | down B / client / round | wall | wall vs dense |", "|---|---|---|---|---|---:|---:|---:|"]
    for r in results:
        ratio = f"{r['wall_s'] / base['wall_s']:.2f}x" if base else "n/a"
        lines.append(
            f"| {r['row']} | {fmt(r['accuracy'], '.3f')} | {fmt(r['loss'], '.4f')} | {fmt(r['density'][1:], '.4f')} | "
            f"{r['up_per_client_round']:,.0f} ({fmt(r['up_by_round'], ',.0f')}) | {r['down_per_client_round']:,.0f} | "
            f"{r['wall_s']:.0f} s | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_pruning"))
    ap.add_argument("--only", default=",".join(ROWS))
    ap.add_argument("--reduced", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the table from OUT/results.jsonl, run nothing")
    ap.add_argument("-o", "--override", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.jsonl"
    if not args.table:
        torch.set_num_threads(2)
        overrides = list(args.override)
        if args.reduced:
            import sys

            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import make_toy_csv

            TOY_CSV.parent.mkdir(parents=True, exist_ok=True)
            make_toy_csv(TOY_CSV)
            overrides = REDUCED + overrides
        for name in args.only.split(","):
            if name not in ROWS:
                raise SystemExit(f"--only: unknown row '{name}' (rows: {', '.join(ROWS)})")
            result = run_row(name, overrides, out, args.reduced)
            with store.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{name}: accuracy {fmt(result['accuracy'], '.3f')}, {result['wall_s']:.0f} s", flush=True)
    latest: dict[str, dict] = {}
    for line in store.read_text().splitlines() if store.exists() else []:
        r = json.loads(line)
        latest[r["row"]] = r
    print(table([latest[n] for n in ROWS if n in latest]))


if __name__ == "__main__":
    main()
