"""Heterogeneous clients: accuracy per round and against simulated time, bytes per tier.

    PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/heterogeneous.py \
        [--out runs/heterogeneous] [--only hetlora,fedra] [--full] [--table] [--write-doc]

Runs every config of examples/heterogeneous/ (three tiers: phone, laptop, server; see the
configs) one after the other in this process (torch threads 2):

- ``uniform_weakest``: everyone at the weakest tier's capacity (LoRA rank 2);
- ``hetlora``, ``flexlora``: per-tier ranks 2/4/8; ``fedra``: per-tier layers 2/4/6 (each client
  runs the sub-model of its allocated layers; ``fedra_full_forward``: every layer, frozen);
- ``lora_ceiling``: LoRA r=8 everywhere, as if every device could afford it;
- ``split`` (cut 3 for everyone) and ``split_multicut`` (cuts 1/3/5 by tier): split steps
  run inside the client function (learner ``split``);
- ``splitfed`` (cut 3) and ``splitfed_multicut`` (cuts 1/3/5): SplitFed-V1 over the round's
  exchange phases (learner and exchange ``splitfed``), one exchange per local step; their
  bytes are the loop's own counts.

``--memory`` measures the training memory of one client step (``benchmarks/split_memory.py``:
the whole model, and a split client at each cut) on the job's model and stores it as the
row ``memory``.

By default on the REDUCED job (``REDUCED`` and ``reduced_roles`` below): the configs'
methods and LoRA settings (r=8 model, alpha 16, query+value, AdamW), but a tiny random-init
BERT with the configs' tokenizer (hidden 32, 4 layers) on the tests' separable toy
sentiment CSV (480 rows in 12 groups, written to runs/heterogeneous-toy.csv), 6 clients
(2 per tier; tiers: ranks 2/4/8, layers 1/2/4, cuts 1/2/3, the configs' speeds and
bandwidths), 40 examples per client, lr 0.05, batch 8, 80 test examples, 4 rounds: the
machine this was measured on had 2 shared cores, where one round of the MiniLM quickstart
took over 4 minutes. ``--full`` runs the configs as they
are (the quickstart job in three tiers), which is still to be done. Simulated time is the ``sim_clock`` server step's
(``runtime/capacity.py``), from each client's measured per-step cost, its tier's
``speed`` and bandwidth. Results accumulate in OUT/results.jsonl; ``--table`` prints the
tables from it; ``--write-doc`` writes them into docs/heterogeneous.md between the
markers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "heterogeneous"
RUNS = ["uniform_weakest", "hetlora", "flexlora", "fedra", "fedra_full_forward", "lora_ceiling", "split", "split_multicut", "splitfed", "splitfed_multicut"]
SPLIT_CUTS = (1, 2, 3)  # the reduced job's cuts (4 layers)
TIERS = ["phone", "laptop", "server"]
TOY_CSV = ROOT / "runs" / "heterogeneous-toy.csv"
REDUCED = [
    "rounds=4",
    "model.init=random",
    "model.config_overrides={hidden_size: 32, num_hidden_layers: 4, num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 128}",
    "data.source=file",
    f"data.path={TOY_CSV}",
    "data.group_column=group",
    "data.max_length=16",
    "federation.clients=6",
    "federation.examples_per_client=40",
    "federation.test_examples=80",
    "train.lr=0.05",
    "train.batch_size=8",
    "server.checkpoint=false",
    "runtime.threads=2",
    "runtime.progress=false",
]
# The reduced job's tiers (2 clients each; the model has 4 layers): LoRA ranks by run,
# trainable layers 1/2/4, cut points 1/2/3 (split_multicut) or 2 for everyone (split).
RANKS = {"uniform_weakest": (2, 2, 2), "lora_ceiling": (8, 8, 8)}
LINKS = [(0.25, 5), (0.5, 20), (1.0, 100)]


# 40 examples per client, batch 8: 5 local steps per round, one exchange each.
SPLITFED_STEPS = {k: ["exchanges=[{name: splitfed, steps: 5}]"] for k in ("splitfed", "splitfed_multicut")}


def reduced_roles(label: str) -> str:
    """The tiers with the one capacity key the run's learner reads (rank, layers or cut)
    beside ``sim_clock``'s speed and bandwidth."""
    ranks = RANKS.get(label, (2, 4, 8))
    layers, cuts = (1, 2, 4), ((2, 2, 2) if label in ("split", "splitfed") else SPLIT_CUTS)
    key = "rank" if label in ("hetlora", "flexlora", *RANKS) else "layers" if label.startswith("fedra") else "cut" if label.startswith("split") else None
    roles = []
    for tier, r, n, c, (speed, mbps) in zip(TIERS, ranks, layers, cuts, LINKS):
        capacity = {"rank": f"rank: {r}, ", "layers": f"layers: {n}, ", "cut": f"cut: {c}, ", None: ""}[key]
        profile = f"{{{capacity}speed: {speed}, bandwidth_mbps: {mbps}}}"
        roles.append(f"{{name: {tier}, count: 2, profile: {profile}}}")
    return "federation.roles=[" + ", ".join(roles) + "]"


def make_toy_data() -> None:
    """The tests' separable toy sentiment CSV (tests/conftest.py), 480 rows in 12 groups."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_toy_csv

    TOY_CSV.parent.mkdir(parents=True, exist_ok=True)
    make_toy_csv(TOY_CSV, n=480)


DOC = ROOT / "docs" / "heterogeneous.md"
BEGIN, END = "<!-- heterogeneous:begin -->", "<!-- heterogeneous:end -->"


def client_weights_mb(exp, cut: int) -> float:
    """fp32 MB of the weights a split client holds: embeddings + ``cut`` layers (computed)."""
    from fedfm.learners.split import bert_parts
    from fedfm.runtime.workbench import Workbench

    parts = bert_parts(Workbench(exp).model)
    n = sum(p.numel() for p in parts.bert.embeddings.parameters())
    n += sum(p.numel() for layer in parts.layers[:cut] for p in layer.parameters())
    return n * 4 / 2**20


def run_one(label: str, overrides: list[str], out: Path) -> dict:
    from fedfm.components import config_profile_keys
    from fedfm.config import load_config
    from fedfm.core.profile_keys import unread_profile_keys
    from fedfm.runtime import LocalRuntime

    exp = load_config(EXAMPLES / f"{label}.yaml", overrides=overrides)
    unread = unread_profile_keys(exp, config_profile_keys(exp))
    assert not unread, f"{label}: {unread}"  # the tiers carry only what the run reads
    t0 = time.perf_counter()
    LocalRuntime(exp, out / label, progress=False, overwrite=True).run()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / label / "metrics.jsonl").read_text().splitlines()]
    per_tier = {t: sum(r.get(f"sim_clock.bytes_up.{t}", 0) + r.get(f"sim_clock.bytes_down.{t}", 0) for r in rows) for t in TIERS}
    result = {
        "label": label,
        "overrides": overrides,
        "accuracy": [r.get("accuracy") for r in rows],
        "sim_total_s": [r.get("sim_clock.sim_total_s", 0.0) for r in rows],
        "comm_s": comm_seconds(rows),
        "tier_bytes": per_tier,
        "bytes_up": sum(r.get("bytes_up", 0) for r in rows),
        "bytes_down": sum(r.get("bytes_down", 0) for r in rows),
        "wall_s": wall,
    }
    if label.startswith("split"):
        cuts = sorted({int(r.profile["cut"]) for r in exp.federation.roles})
        result["cuts"] = cuts
        result["split_wire_per_round"] = sum(per_tier.values()) / max(exp.rounds, 1)
        result["client_weights_mb"] = {c: round(client_weights_mb(exp, c), 2) for c in cuts}
        trained = [r for r in rows[1:] if r.get("clients")]
        result["loop_bytes_per_round"] = sum(r["bytes_up"] + r["bytes_down"] for r in trained) / max(len(trained), 1)
        steps = [sum(v["up"] + v["down"] for v in r.get("phase_bytes", {}).values()) for r in trained]
        result["phase_bytes_per_round"] = sum(steps) / max(len(trained), 1)
    return result


def memory_row(overrides: list[str], config: str = "splitfed_multicut") -> dict:
    """The training memory of one client step: whole model vs a split client at each cut."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from split_memory import client_memory, workbench

    wb = workbench(EXAMPLES / f"{config}.yaml", overrides)
    cuts = list(SPLIT_CUTS) if overrides else [1, 3, 5]
    label = "memory" if overrides else "memory_full"
    return {"label": label, "overrides": overrides, "accounts": client_memory(wb, cuts, wb.exp.train.batch_size)}


def comm_seconds(rows: list[dict]) -> float:
    """The communication part of the simulated time: the slowest transfer of each round,
    summed (bytes and bandwidths only, so it does not depend on the machine's load)."""
    return float(sum(r.get("sim_clock.comm_s_max", 0.0) for r in rows))


def fmt_acc(accs: list) -> str:
    return " | ".join(f"{a:.3f}" if a is not None else "-" for a in accs)


def tables(results: list[dict]) -> str:
    main = [r for r in results if not r["label"].startswith(("split", "memory"))]
    split = [r for r in results if r["label"].startswith("split")]
    memories = [r for r in results if r["label"].startswith("memory")]
    lora = next((r for r in results if r["label"] == "lora_ceiling"), None)
    out = []
    if main:
        rounds = max(len(r["accuracy"]) for r in main)
        head = ["run"] + [f"acc r{i}" for i in range(rounds)] + ["sim time s (end)", "comm s (slowest transfer, summed)"] + [f"bytes {t}" for t in TIERS] + ["wall s"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in main:
            tiers = " | ".join(f"{r['tier_bytes'][t]:,}" for t in TIERS)
            out.append(f"| {r['label']} | {fmt_acc(r['accuracy'])} | {r['sim_total_s'][-1]:.1f} | {r['comm_s']:.3f} | {tiers} | {r['wall_s']:.0f} |")
        out += ["", "Accuracy against simulated time (cumulative `sim_clock.sim_total_s` after each round):", ""]
        out += ["| run | (sim s, acc) per round |", "|---|---|"]
        for r in main:
            pts = ", ".join(f"({s:.1f}, {a:.3f})" for s, a in zip(r["sim_total_s"][1:], r["accuracy"][1:]) if a is not None)
            out.append(f"| {r['label']} | {pts} |")
    if split:
        out += ["", "Split learning against LoRA on the whole model (`split*`: split steps inside the client function; "
                "`splitfed*`: one exchange phase per step; lossless):", ""]
        rounds = max(len(r["accuracy"]) for r in split)
        head = ["run", "cuts"] + [f"acc r{i}" for i in range(rounds)] + [
            "link bytes per round (up+down, all clients)", "counted by", "sim time s (end)", "wall s"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in ([lora] if lora else []) + split:
            cuts = "/".join(str(c) for c in r.get("cuts", [])) or "-"
            if r["label"] == "lora_ceiling":
                link, how = (r["bytes_up"] + r["bytes_down"]) / max(len(r["accuracy"]) - 1, 1), "the loop (State payloads)"
            elif r["label"].startswith("splitfed"):
                link = r["loop_bytes_per_round"]
                how = f"the loop: train phase + split phases ({r['phase_bytes_per_round']:,.0f} of it in phase_bytes)"
            else:
                link, how = r["split_wire_per_round"], "the learner (activations, gradients, client-side weights; sim_clock)"
            out.append(f"| {r['label']} | {cuts} | {fmt_acc(r['accuracy'])} | {link:,.0f} | {how} | {r['sim_total_s'][-1]:.1f} | {r['wall_s']:.0f} |")
    for memory in memories:
        acc = memory["accounts"]
        job = "reduced job, tiny BERT" if memory["label"] == "memory" else "quickstart job, MiniLM-L6"
        out += ["", f"Client training memory of one local step ({job}; batch {acc['shape'][0]} x {acc['shape'][1]} tokens; "
                "tensor account, benchmarks/split_memory.py), MB:", ""]
        head = ["client holds", "weights", "grads + AdamW moments", "saved activations", "activations + gradient (link)", "total", "vs whole"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        whole = acc["whole"]["total"]
        for k, a in acc.items():
            if k == "shape":
                continue
            mb = lambda b: f"{b / 2**20:.3f}"  # noqa: E731
            name = "the whole model" if k == "whole" else f"embeddings + {k.split()[1]} layer(s)"
            out.append(f"| {name} | {mb(a['weights'])} | {mb(a['grads'] + a['adam_moments'])} | {mb(a['saved_activations'])} | "
                       f"{mb(a['io'])} | {mb(a['total'])} | {a['total'] / whole:.2f} |")
    return "\n".join(out)


def write_doc(text: str, full: bool = False) -> None:
    """Between the markers of the reduced job's tables, or with ``full`` of the full job's."""
    begin, end = (BEGIN.replace("heterogeneous", "heterogeneous-full"), END.replace("heterogeneous", "heterogeneous-full")) if full else (BEGIN, END)
    doc = DOC.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{DOC} has no {begin} ... {end} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "heterogeneous")
    ap.add_argument("--only", default="", help="comma-separated runs (default: all; 'none': only --memory)")
    ap.add_argument("--full", action="store_true", help="the configs as they are, not the reduced job")
    ap.add_argument("--table", action="store_true", help="print the tables from OUT/results.jsonl, run nothing")
    ap.add_argument("--write-doc", action="store_true", help="write the tables into docs/heterogeneous.md")
    ap.add_argument("--memory", action="store_true", help="also measure client training memory (the row 'memory')")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (runtime.threads of every run)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.jsonl"
    if not args.table:
        torch.set_num_threads(args.threads)
        labels = [s for s in args.only.split(",") if s and s != "none"] if args.only else RUNS
        if not args.full:
            make_toy_data()
        if args.memory:
            r = memory_row([] if args.full else REDUCED + [reduced_roles("splitfed_multicut")])
            print(json.dumps(r), flush=True)
            with store.open("a") as f:
                f.write(json.dumps(r) + "\n")
        for label in labels:
            overrides = [] if args.full else REDUCED + [reduced_roles(label)] + SPLITFED_STEPS.get(label, [])
            overrides = overrides + [f"runtime.threads={args.threads}"]
            r = run_one(label, overrides, args.out)
            print(json.dumps(r), flush=True)
            with store.open("a") as f:
                f.write(json.dumps(r) + "\n")
    latest: dict[str, dict] = {}
    for line in store.read_text().splitlines() if store.exists() else []:
        r = json.loads(line)
        metrics = args.out / r["label"] / "metrics.jsonl"
        if "comm_s" not in r and metrics.exists():  # results written before the column existed
            r["comm_s"] = comm_seconds([json.loads(x) for x in metrics.read_text().splitlines()])
        latest[r["label"]] = r
    results = [latest[k] for k in RUNS + ["memory", "memory_full"] if k in latest]
    text = tables(results)
    print(text)
    if args.write_doc:
        write_doc(text, full=args.full)


if __name__ == "__main__":
    main()
