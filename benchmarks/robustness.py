"""The attack x defense matrix on a reduced job; writes the table of docs/robustness.md.

    PYTHONPATH=src python benchmarks/robustness.py [--attacks none,alie] [--defenses fedavg,krum]
        [--out runs/robustness] [--table]

The job (``job()``): the tiny random-init BERT of tests/conftest.py (2 layers, hidden 32,
MiniLM's tokenizer) with LoRA r=4 on query/value, on the toy sentiment CSV of
``make_toy_csv`` (600 rows, separable by word choice), 12 clients (iid), 120 test
examples, ROUNDS rounds of one local epoch (AdamW lr 0.05, batch 8), every client every
round. Attackers: 20% of the clients (2 of 12, drawn by the seed), through the
``attack:`` section. Each cell runs in this process (one workbench per attack row: the
roles decide who attacks) and records the clean accuracy after every round (the table shows
the final one and, in brackets, the one a round earlier), the backdoor attack
success rate (ASR: triggered test examples whose label is not the target, classified as
the target; measured in every cell) and the wall time. Results accumulate in
OUT/results.jsonl (a cell already there is skipped); ``--table`` rebuilds the table and
the doc section from it. The aggregation time of each rule alone is measured on 12
random updates shaped like MiniLM's LoRA r=8 State (``--rule-times``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

ROUNDS = 4
CLIENTS = 12
F = 2  # attackers per round the rules are told to tolerate (20% of 12, every client every round)
TRIGGER, TARGET = "cf", 1
BOUND = 4.0  # norm_bound max_norm and centered_clip tau: about the honest update norm of this job (3.6-5.2, see docs)

ATTACKS = {
    "none": None,
    "sign_flip": {"name": "sign_flip"},
    "gaussian_noise": {"name": "gaussian_noise", "std": 0.1},
    "scaling": {"name": "scaling", "factor": 10.0},
    "label_flip": {"name": "label_flip"},
    "backdoor": {"name": "backdoor", "trigger": TRIGGER, "target": TARGET, "poison_fraction": 0.5},
    # the backdoor boosted as in model replacement (Bagdasaryan et al. 2020): every example
    # poisoned, the update scaled x5; two middleware, so the role is written out in full
    "backdoor_boost": [
        {"name": "backdoor", "trigger": TRIGGER, "target": TARGET, "poison_fraction": 1.0},
        {"name": "scaling", "factor": 5.0},
    ],
    "alie": {"name": "alie"},
    "ipm": {"name": "ipm", "epsilon": 0.5},
}

DEFENSES = {
    "fedavg": {},
    "median": {"aggregator": {"rule": "median"}},
    "trimmed_mean": {"aggregator": {"rule": "trimmed_mean", "beta": 0.2}},
    "krum": {"aggregator": {"rule": "krum", "f": F}},
    "krum_product": {"aggregator": {"rule": "krum", "f": F, "space": "lora_product"}},
    "multi_krum": {"aggregator": {"rule": "multi_krum", "f": F, "m": CLIENTS - 2 * F}},
    "bulyan": {"aggregator": {"rule": "bulyan", "f": F}},
    "geometric_median": {"aggregator": {"rule": "geometric_median"}},
    "clipped_clustering": {"aggregator": {"rule": "clipped_clustering"}},
    "clipped_clustering_product": {"aggregator": {"rule": "clipped_clustering", "space": "lora_product"}},
    "centered_clip": {"server_steps": [{"name": "centered_clip", "tau": BOUND}]},
    "norm_bound_weak_dp": {"server_steps": [{"name": "norm_bound", "max_norm": BOUND}, {"name": "weak_dp", "std": 0.001}]},
    "fedfa": {"server_steps": [{"name": "fedfa"}]},
}
UNTARGETED = ["sign_flip", "gaussian_noise", "scaling", "label_flip", "alie", "ipm"]


def job(tmp: Path, attack: str, defense: str) -> dict:
    from conftest import make_toy_csv, tiny_config

    tmp.mkdir(parents=True, exist_ok=True)
    csv = tmp / "toy.csv"
    if not csv.exists():
        make_toy_csv(csv, n=600)
    over = {
        "rounds": ROUNDS,
        "federation.clients": CLIENTS,
        "federation.partitioner": {"name": "iid"},
        "federation.test_examples": 120,
        "train.lr": 0.05,
        "train.epochs": 1,
        "server.checkpoint": False,
        "runtime.threads": 1,
    }
    raw = tiny_config(tmp, **over)
    patch = DEFENSES[defense]
    for key, value in patch.items():
        if key == "server_steps":
            raw["server_steps"] = list(raw.get("server_steps", [])) + value
        else:
            raw[key] = value
    spec = ATTACKS[attack]
    if isinstance(spec, list):
        raw["federation"]["roles"] = [{"name": "attacker", "fraction": 0.2, "middleware": spec}]
    elif spec is not None:
        raw["attack"] = {**spec, "fraction": 0.2}
    return raw


def run_cell(tmp: Path, out: Path, attack: str, defense: str, benches: dict) -> dict:
    from fedfm.attacks.backdoor import attack_success_rate
    from fedfm.config import from_dict
    from fedfm.runtime import LocalRuntime, Workbench

    exp = from_dict(job(tmp, attack, defense))
    if attack not in benches:
        benches.clear()  # one workbench alive at a time
        benches[attack] = Workbench(exp)
    wb = benches[attack]
    run_dir = out / attack / defense
    t0 = time.perf_counter()
    rt = LocalRuntime(exp, run_dir, progress=False, workbench=wb, overwrite=True)
    rt.run()
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = rt.final_state
    return {
        "attack": attack,
        "defense": defense,
        "accuracy": [r.get("accuracy") for r in rows],
        "asr": attack_success_rate(wb, state, TRIGGER, TARGET),
        "wall_s": wall,
        "attackers": sorted(c.cid for c in wb.clients if c.profile.get("role") == "attacker"),
    }


def rule_times(repeat: int = 3) -> dict[str, float]:
    """Seconds per aggregation of 12 random updates shaped like MiniLM LoRA r=8 (q, v)."""
    from fedfm.aggregators import aggregators
    from fedfm.aggregators.pipeline import Pipeline
    from fedfm.core.protocols import RoundContext
    from fedfm.core.types import ClientSpec, Update

    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(6):
        for m in ("query", "value"):
            state[f"l{layer}.{m}.lora_A.default.weight"] = torch.randn(8, 384, generator=g) * 0.02
            state[f"l{layer}.{m}.lora_B.default.weight"] = torch.randn(384, 8, generator=g) * 0.02
    state["classifier.weight"] = torch.zeros(2, 384)
    deltas = [{k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()} for _ in range(CLIENTS)]
    clients = [ClientSpec(cid=i, indices=[], profile={"role": "default"}) for i in range(CLIENTS)]
    out = {}
    for label, patch in DEFENSES.items():
        if label == "fedfa":  # its Fisher needs the model: not timed here
            continue
        agg = patch.get("aggregator", {"rule": "fedavg"})
        rule = aggregators.get(agg["rule"])
        params = aggregators.parse(agg["rule"], {k: v for k, v in agg.items() if k != "rule"}, "aggregator")
        steps = patch.get("server_steps", [])
        best = float("inf")
        for _ in range(repeat):
            ups = [Update(cid=i, payload=d, num_examples=40) for i, d in enumerate(deltas)]
            t0 = time.perf_counter()
            kept = Pipeline.from_specs(steps).run("updates", ups, {}, RoundContext(1, 0, g, CLIENTS, clients), {})
            rule.obj(state, [u.payload for u in kept], [u.num_examples for u in kept], params)
            best = min(best, time.perf_counter() - t0)
        out[label] = best
    return out


def table(results: list[dict], attacks: list[str], defenses: list[str]) -> str:
    cell = {(r["attack"], r["defense"]): r for r in results}
    head = ["defense \\ attack"] + [a if not a.startswith("backdoor") else f"{a} (acc / ASR)" for a in attacks] + ["clean ASR", "wall s (none)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in defenses:
        row = [d]
        for a in attacks:
            r = cell.get((a, d))
            if r is None:
                row.append("not run")
            elif "error" in r:
                row.append("refused" if "refused" in r["error"] else "failed")
            elif a.startswith("backdoor"):
                row.append(f"{r['accuracy'][-1]:.3f} ({r['accuracy'][-2]:.3f}) / {r['asr']:.2f}")
            else:
                row.append(f"{r['accuracy'][-1]:.3f} ({r['accuracy'][-2]:.3f})")
        clean = cell.get(("none", d))
        row.append(f"{clean['asr']:.2f}" if clean and "error" not in clean else "-")
        row.append(f"{clean['wall_s']:.0f}" if clean and "error" not in clean else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def recommend(results: list[dict], defenses: list[str]) -> str:
    cell = {(r["attack"], r["defense"]): r for r in results if "error" not in r}
    lines = []
    best = None
    for d in defenses:
        clean = cell.get(("none", d))
        if clean is None:
            continue
        drops = {a: clean["accuracy"][-1] - cell[(a, d)]["accuracy"][-1] for a in UNTARGETED if (a, d) in cell}
        backdoors = [cell[(a, d)]["asr"] for a in ATTACKS if a.startswith("backdoor") and (a, d) in cell]
        if len(drops) < len(UNTARGETED) or not backdoors:
            continue
        worst = max(drops.values())
        asr = max(backdoors)
        ok = worst <= 0.02 and asr <= 0.10
        # tie-break: the worst drop one round earlier, over every attack (backdoors included)
        earlier = max(clean["accuracy"][-2] - cell[(a, d)]["accuracy"][-2] for a in ATTACKS if a != "none" and (a, d) in cell)
        which = f" ({max(drops, key=drops.get)})" if worst > 0 else ""
        lines.append(
            f"- {d}: clean {clean['accuracy'][-1]:.3f}, worst final drop {100 * worst:.1f} points{which}, worst backdoor ASR {asr:.2f}, "
            f"worst drop a round earlier {100 * earlier:.1f} points{' - meets the goal' if ok else ''}"
        )
        key = (not ok, round(worst, 6), round(asr, 6), round(earlier, 6), -clean["accuracy"][-1])
        if best is None or key < best[0]:
            best = (key, d)
    if best is not None:
        lines.append(f"\nRecommended (meets the goal; then the fewest final points lost to an untargeted attack, the lowest backdoor ASR, the fewest points lost a round earlier to any attack): **{best[1]}**.")
    return "\n".join(lines) if lines else "No defense has every cell yet."


def write_doc(text: str, marker: str) -> None:
    doc = ROOT / "docs" / "robustness.md"
    if not doc.exists():
        print("docs/robustness.md does not exist; not written")
        return
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    body = doc.read_text()
    if start not in body:
        print(f"docs/robustness.md has no {start} marker; not written")
        return
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "robustness")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--defenses", default=",".join(DEFENSES))
    ap.add_argument("--table", action="store_true", help="only rebuild the table and doc from OUT/results.jsonl")
    ap.add_argument("--rule-times", action="store_true", help="only time each rule on MiniLM-sized LoRA updates")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    attacks, defenses = args.attacks.split(","), args.defenses.split(",")
    if args.rule_times:
        times = rule_times()
        lines = ["| rule | ms per aggregation |", "|---|---|"] + [f"| {k} | {1000 * v:.1f} |" for k, v in times.items()]
        print("\n".join(lines))
        write_doc("\n".join(lines), "rule-times")
        return
    done = set()
    if results_path.exists():
        done = {(r["attack"], r["defense"]) for r in map(json.loads, results_path.read_text().splitlines()) if "failed" not in r.get("error", "")}
    if not args.table:
        print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC -> {args.out}", flush=True)
        benches: dict = {}
        for a in attacks:
            for d in defenses:
                if (a, d) in done:
                    continue
                try:
                    res = run_cell(args.out / "data", args.out, a, d, benches)
                except Exception as exc:  # a refused combination is a result too
                    res = {"attack": a, "defense": d, "error": f"{'refused' if 'invalid config' in str(exc) else 'failed'}: {exc}"[:400]}
                with open(results_path, "a") as f:
                    f.write(json.dumps(res) + "\n")
                print(json.dumps(res), flush=True)
    results = [json.loads(l) for l in results_path.read_text().splitlines()] if results_path.exists() else []
    latest = {(r["attack"], r["defense"]): r for r in results}  # a retried cell replaces its failure
    results = list(latest.values())
    all_attacks = [a for a in ATTACKS if any(r["attack"] == a for r in results)]
    all_defenses = [d for d in DEFENSES if any(r["defense"] == d for r in results)]
    text = table(results, all_attacks, all_defenses) + "\n\n" + recommend(results, all_defenses)
    print(text)
    write_doc(text, "robustness-table")


if __name__ == "__main__":
    main()
