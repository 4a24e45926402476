"""Classification through a causal LM's label words (``model.task: lm_classification``,
tasks/verbalizer.py) on SmolLM2-135M-Instruct and Rotten Tomatoes: the zero-shot accuracy
(round 0 of the LoRA run, whose adapter starts at zero) and the accuracy after federated
rounds of backprop LoRA, black-box FedBPT (its soft prompt started from random vocabulary
tokens, ``fedbpt``, or from an instruction's tokens, ``fedbpt_text``) and BDPL, each from
its example config; and
the zero-shot accuracy on the quickstart's 1,000 test reviews (``zeroshot``: the model as
shipped, one evaluation in its own process), the test set of the MiniLM figures in
docs/zeroth_order.md. Each row gives the majority-class share of its test set.

    PYTHONPATH=src nice -n 5 python benchmarks/verbalizer.py --out runs/verbalizer \
        [--methods zeroshot,lora,fedbpt,fedbpt_text,bdpl] [--rounds N] [--test-examples N] [--zero-shot-examples N] [--table]

Each method runs in its own ``fedfm run`` process on its config written to OUT/<method>.yaml
(the example with the changes in METHODS and the options given); a row gives the test
accuracy and loss after every round, the uplink bytes per client-round and the run's wall
time. Results accumulate in OUT/results.jsonl (the last result per method counts), so
methods can be run in separate invocations; ``--table`` prints the table from it only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FEDBPT = ROOT / "examples" / "zeroth_order" / "fedbpt_verbalizer.yaml"
FEDBPT_TEXT = ROOT / "examples" / "zeroth_order" / "fedbpt_verbalizer_text.yaml"
METHODS = {
    # label: (example config, changes on top of it, what the row is)
    "lora": (ROOT / "examples" / "peft" / "lora_verbalizer.yaml", {},
             "backprop LoRA r8 (q, v), AdamW, 1 epoch of batches of 8; round 0 = zero-shot (examples/peft/lora_verbalizer.yaml)"),
    "fedbpt": (FEDBPT, {}, "FedBPT: 5-token soft prompt, d=20, 3 CMA-ES generations of 12 a round "
                           "(examples/zeroth_order/fedbpt_verbalizer.yaml)"),
    "fedbpt_text": (FEDBPT_TEXT, {}, "FedBPT as above, p_0 from the tokens of \"Negative or positive?\\n\" (init: text; "
                                     "examples/zeroth_order/fedbpt_verbalizer_text.yaml)"),
    "bdpl": (FEDBPT, {"peft": {"method": "discrete_prompt", "length": 5, "candidates": 200},
                      "learner": {"name": "bdpl", "samples": 4, "lr": 0.03, "steps": 4},
                      "server_steps": []},
             "BDPL: 5 discrete tokens of 200 candidates before the text, 4 steps of 4 sampled prompts "
             "(fedbpt_verbalizer.yaml with peft and learner swapped)"),
}


# The zero-shot row: the LoRA example's model and task (LoRA starts at B = 0, the model as
# shipped) evaluated on the quickstart's 1,000 test reviews, the set of the MiniLM figures.
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
ZERO_SHOT = """
import json, sys, time
from fedfm.config import load_config
from fedfm.runtime.workbench import Workbench
t0 = time.perf_counter()
wb = Workbench(load_config(sys.argv[1]))
labels = wb.federation.frame["label"].to_numpy()[wb.federation.test_indices]
m = wb.evaluate(wb.initial_state())
m["majority"] = float(max(labels.mean(), 1 - labels.mean()))
m["wall_s"] = time.perf_counter() - t0
print("RESULT " + json.dumps(m))
"""


def zero_shot(out: Path, test_examples: int | None) -> dict:
    """The model as shipped on the quickstart's test set (its federation: the same groups held out)."""
    raw = yaml.safe_load(METHODS["lora"][0].read_text())
    raw["federation"] = yaml.safe_load(QUICKSTART.read_text())["federation"]
    if test_examples is not None:
        raw["federation"]["test_examples"] = test_examples
    raw.setdefault("runtime", {})["progress"] = False
    config = out / "zeroshot.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run([sys.executable, "-c", ZERO_SHOT, str(config)], env=env(), capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"label": "zeroshot", "error": ((proc.stdout + proc.stderr).strip().splitlines() or ["failed"])[-1], "wall_s": 0.0}
    m = json.loads(lines[-1][len("RESULT "):])
    return {"label": "zeroshot", "note": "SmolLM2 as shipped, no training; the quickstart's test set (natural, seed 0)",
            "config": str(config), "test_examples": raw["federation"]["test_examples"], "accuracy": [m["accuracy"]],
            "loss": [m["loss"]], "majority": m["majority"], "bytes_per_client_round": 0.0, "wall_s": m["wall_s"]}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("peft", "learner"):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_config(label: str, out: Path, rounds: int | None, test_examples: int | None) -> Path:
    example, changes, _ = METHODS[label]
    raw = merge(yaml.safe_load(example.read_text()), changes)
    raw["name"] = f"verbalizer-{label}"
    if rounds is not None:
        raw["rounds"] = rounds
    if test_examples is not None:
        raw["federation"]["test_examples"] = test_examples
    raw.setdefault("runtime", {})["progress"] = False
    path = out / f"{label}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_method(label: str, out: Path, rounds: int | None, test_examples: int | None) -> dict:
    config = write_config(label, out, rounds, test_examples)
    run_dir = out / label
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "fedfm", "run", str(config), "--out", str(run_dir), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr).strip().splitlines() or ["failed"]
        return {"label": label, "error": said[-1], "wall_s": wall}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows[1:] if r.get("clients")]
    client_rounds = sum(len(r["clients"]) for r in trained)
    return {
        "label": label,
        "note": METHODS[label][2],
        "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        "test_examples": yaml.safe_load(config.read_text())["federation"]["test_examples"],
        "accuracy": [r.get("accuracy") for r in rows],
        "loss": [r.get("loss") for r in rows],
        "bytes_per_client_round": sum(r["bytes_up"] for r in trained) / max(client_rounds, 1),
        "majority": test_majority(config),
        "wall_s": wall,
    }


def test_majority(config: Path) -> float:
    """The majority-class share of the run's test set (the accuracy of always guessing it)."""
    from fedfm.config import load_config
    from fedfm.data import build_federation, load_source

    exp = load_config(config)
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    share = float(fed.frame["label"].to_numpy()[fed.test_indices].mean())
    return max(share, 1 - share)


def table(results: list[dict]) -> str:
    lines = ["| method | setting | accuracy per round (r0, r1, ...) | majority class | test loss r0 -> last | bytes up / client-round | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | {r['wall_s']:.0f} |")
            continue
        acc = ", ".join(f"{a:.3f}" for a in r["accuracy"])
        lines.append(f"| {r['label']} | {r['note']}; {r['test_examples']} test reviews | {acc} | {r['majority']:.3f} | "
                     f"{r['loss'][0]:.4f} -> {r['loss'][-1]:.4f} | {r['bytes_per_client_round']:,.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "verbalizer")
    ap.add_argument("--methods", default="zeroshot,lora,fedbpt,fedbpt_text,bdpl")
    ap.add_argument("--zero-shot-examples", type=int, default=None, help="test reviews of the zero-shot row (default the quickstart's 1,000)")
    ap.add_argument("--rounds", type=int, default=None, help="default: each example's own")
    ap.add_argument("--test-examples", type=int, default=None, help="default: each example's own (200)")
    ap.add_argument("--table", action="store_true", help="print the table from OUT/results.jsonl only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    if not args.table:
        for label in args.methods.split(","):
            if label not in METHODS and label != "zeroshot":
                raise SystemExit(f"--methods: unknown '{label}'; known: zeroshot, {', '.join(METHODS)}")
            if label == "zeroshot":
                result = zero_shot(args.out, args.zero_shot_examples)
            else:
                result = run_method(label, args.out, args.rounds, args.test_examples)
            with path.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        latest[r["label"]] = r
    print(table([latest[k] for k in ("zeroshot", *METHODS) if k in latest]))


if __name__ == "__main__":
    main()
