"""The multi-domain prompt and DAPT-chain rows of benchmarks/adaptability.py.

``--part multidomain`` (REDUCED_MD): FedAPT (``examples/adaptability/fedapt.yaml``) against
a single shared prompt (the same config, code and training with one key: ``num_domains=1``,
every client domain 0; the prompt is then ``prompt * (1 + key_0)``, one vector sequence
for every input, and the domain loss is 0). The politics corpus, 4 clients (0, 2: 2012
convention passages; 1, 3: 2016 debate statements), whole speakers per client, label the
party. Per-domain accuracy of the final global model on the test rows of each domain
(whole speakers no client owns) and on the clients' own held-out slices pooled per domain,
plus the share of test inputs whose adaptive-network argmax is their own domain's key.

``--part dapt_chain`` (REDUCED_DAPT): party classification of 2012 convention passages with
LoRA, started from MiniLM (no DAPT, R1 + R2 rounds) or from the final State of R1 rounds
of federated masked-LM FFDAPT on the same clients' passages followed by R2 rounds of
fine-tuning (``run_chain``): equal rounds and local steps in total.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from fedfm.config import from_dict
from fedfm.personalize.init_from import run_chain
from fedfm.runtime import LocalRuntime

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "adaptability"

REDUCED_MD = [
    "federation.examples_per_client=64",
    "federation.test_examples=200",
    "data.max_length=48",
    "train.batch_size=8",
    "rounds=4",
    "eval.every=4",
    "eval.clients=none",
    "runtime.progress=false",
    "runtime.threads=1",
]
MULTIDOMAIN = {  # label: overrides of examples/adaptability/fedapt.yaml
    "single shared prompt (fedapt code, K=1)": ["peft.num_domains=1"],
    "fedapt K=2 (a key per domain)": [],
}
R1, R2 = 2, 2
REDUCED_DAPT = [
    "federation.clients=4",
    "federation.examples_per_client=64",
    "federation.test_examples=200",
    "data.max_length=48",
    "train.batch_size=8",
    "runtime.progress=false",
    "runtime.threads=1",
]


def raw_config(name: str, overrides: list[str]) -> dict:
    from fedfm.config import apply_overrides

    return apply_overrides(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()), overrides)


def domain_of(frame, rows) -> list[str]:
    return [str(g).split(":", 1)[0] for g in frame["group"].iloc[list(rows)]]


def key_choice(wb, state, items) -> list[int]:
    """The adaptive network's argmax key for each of ``items`` (global model)."""
    wb.evaluate(state, [])  # sets the State
    out = []
    for batch in wb.batches(items):
        with torch.no_grad():
            wb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out += wb.model.fedapt.last_scores.argmax(-1).tolist()
    return out


def run_multidomain(label: str, extra: list[str], out: Path) -> dict:
    raw = raw_config("fedapt", REDUCED_MD + extra)
    k = raw["peft"]["num_domains"]
    if k == 1:
        for role in raw["federation"]["roles"]:
            role["profile"]["domain"] = 0
    exp = from_dict(raw, "fedapt")
    t0 = time.perf_counter()
    rt = LocalRuntime(exp, out / label.split(" (")[0].replace(" ", "-"), overwrite=True)
    rt.run()
    wall = time.perf_counter() - t0
    wb, state = rt.wb, rt.loop.final_state
    frame = wb.federation.frame
    names = sorted(set(domain_of(frame, frame.index)))
    res = {"label": label, "kind": "multidomain", "overrides": extra, "wall_s": wall}
    test = wb.federation.test_indices.tolist()
    res["accuracy"] = wb.evaluate(state)["accuracy"]
    for d, name in enumerate(names):
        rows = [i for i, n in zip(test, domain_of(frame, test)) if n == name]
        res[f"test_{name}"] = wb.evaluate(state, wb.batches(wb._rows(rows)))["accuracy"]
        res[f"n_test_{name}"] = len(rows)
        held = [i for c in wb.clients if c.profile.get("role") and domain_of(frame, c.indices[:1])[0] == name for i in c.eval_indices]
        res[f"held_{name}"] = wb.evaluate(state, wb.batches(wb._rows(held)))["accuracy"]
        res[f"n_held_{name}"] = len(held)
        res[f"majority_{name}"] = float(max(frame["label"].iloc[rows].mean(), 1 - frame["label"].iloc[rows].mean()))
    if k > 1:
        truth = [names.index(n) for n in domain_of(frame, test)]
        chosen = key_choice(wb, state, wb._rows(test))
        res["key_selection"] = sum(int(a == b) for a, b in zip(chosen, truth)) / len(truth)
    rows = [json.loads(x) for x in (rt.out / "metrics.jsonl").read_text().splitlines()]
    res["bytes_up"] = sum(r.get("bytes_up", 0) for r in rows)
    res["domains"] = names
    return res


def run_dapt_chain(label: str, out: Path) -> dict:
    t0 = time.perf_counter()
    tune = raw_config("dapt_chain_finetune", REDUCED_DAPT)
    folder = out / ("with-dapt" if "with" in label else "no-dapt")
    if "with" in label:
        dapt = raw_config("dapt_chain_dapt", REDUCED_DAPT + [f"rounds={R1}", f"eval.every={R1}"])
        tune["rounds"], tune.setdefault("eval", {})["every"] = R2, R2
        run_chain([dapt, tune], folder, overwrite=True)
        stages = [folder / "stage-0", folder / "stage-1"]
    else:
        tune["rounds"], tune.setdefault("eval", {})["every"] = R1 + R2, R1 + R2
        LocalRuntime(from_dict(tune, "dapt_chain_finetune"), folder / "stage-0", overwrite=True).run()
        stages = [folder / "stage-0"]
    wall = time.perf_counter() - t0
    metrics = [[json.loads(x) for x in (s / "metrics.jsonl").read_text().splitlines()] for s in stages]
    last = metrics[-1][-1]
    res = {"label": label, "kind": "dapt_chain", "accuracy": last.get("accuracy"), "loss": last.get("loss"),
           "initial_accuracy": metrics[-1][0].get("accuracy"), "rounds": [len(m) - 1 for m in metrics],
           "bytes_up": sum(r.get("bytes_up", 0) for m in metrics for r in m), "wall_s": wall}
    if len(metrics) == 2:
        res["mlm_loss"] = [metrics[0][0].get("loss"), metrics[0][-1].get("loss")]
    return res


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def multidomain_table(results: list[dict]) -> str:
    if not results:
        return ""
    names = results[0]["domains"]
    r0 = results[0]
    head = ["prompt", "test acc (all)"] + [f"test acc {n} (n={r0[f'n_test_{n}']})" for n in names] + [
        f"held-out acc {n} (n={r0[f'n_held_{n}']})" for n in names] + ["key selection", "bytes up", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["label"], fmt(r["accuracy"])] + [fmt(r[f"test_{n}"]) for n in names] + [
            fmt(r[f"held_{n}"]) for n in names] + [fmt(r.get("key_selection"), ".2f"), f"{r['bytes_up']:,}", f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Majority-class share of each domain's test rows: " + ", ".join(f"{n} {r0[f'majority_{n}']:.3f}" for n in names) + ".")
    return "\n".join(lines)


def dapt_chain_table(results: list[dict]) -> str:
    head = ["run", "rounds (DAPT + fine-tune)", "MLM test loss r0 -> last", "party acc r0 -> last", "test loss", "bytes up", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rounds = " + ".join(str(x) for x in r["rounds"]) if len(r["rounds"]) == 2 else f"0 + {r['rounds'][0]}"
        mlm = f"{fmt(r['mlm_loss'][0])} -> {fmt(r['mlm_loss'][1])}" if r.get("mlm_loss") else "-"
        lines.append(f"| {r['label']} | {rounds} | {mlm} | {fmt(r['initial_accuracy'])} -> {fmt(r['accuracy'])} | "
                     f"{fmt(r['loss'])} | {r['bytes_up']:,} | {r['wall_s']:.0f} |")
    return "\n".join(lines)
