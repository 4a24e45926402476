"""Watermarks on a reduced quickstart job: WAFFLE, client-unique copies, a thief's attacks.

    PYTHONPATH=src nice -n 10 python benchmarks/ip.py [--out runs/ip] [--threads 1] [--no-doc]
        [-o federation.examples_per_client=250 -o federation.test_examples=1000 -o rounds=3]

The job is examples/ip/waffle.yaml (the quickstart with the ``waffle`` server step),
reduced by ``JOB`` (8 clients x 96 reviews cut to 32 tokens, 300 test reviews, 2 rounds) unless ``-o``
overrides say otherwise. One Workbench (one MiniLM in memory) serves everything:

1. the job without and with WAFFLE (``server_steps: []`` vs the example's step): final
   clean accuracy, per-round watermark accuracy and steps, and the watermark accuracy and
   binomial p-value of both final models on the owner's key;
2. client-unique copies (DUW-inspired): each of the 8 clients' copy of the watermarked
   final model fine-tuned on its own trigger set; server time, steps and bytes per copy,
   the copy's clean accuracy, and ``trace`` over the 8 client keys for every copy;
3. the thief (client ``THIEF``) attacks its copy: fine-tuning on clean data (every
   client's training reviews: as much as the whole reduced federation) for 1 and 3 epochs
   with the job's train settings, int8 / int4 quantization and top-k pruning through
   fedfm's codec stages; each row gives the clean accuracy, the WAFFLE watermark and the
   thief's own key that survive, and whom ``trace`` names.

It prints every figure and rewrites the measured section of docs/ip.md (``--no-doc``: not).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import fnmatch
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedfm.codecs import Payload, to_bytes  # noqa: E402
from fedfm.config import from_dict  # noqa: E402
from fedfm.ip import Base, WaffleParams, client_copy, trace, trigger_set, verdict  # noqa: E402
from fedfm.ip.loading import trigger_spec  # noqa: E402
from fedfm.ip.removal import codec_roundtrip, fine_tune  # noqa: E402
from fedfm.peft import set_state  # noqa: E402
from fedfm.runtime import LocalRuntime  # noqa: E402
from fedfm.runtime.outputs import read_metrics  # noqa: E402
from fedfm.runtime.workbench import Workbench  # noqa: E402

CONFIG = ROOT / "examples" / "ip" / "waffle.yaml"
# 32 reviews per client and 200 test reviews proved too small: the test set was 82% positive
# and the model learned only that (accuracy 0.82 = the majority rate); see docs/ip.md.
JOB = ["federation.examples_per_client=96", "federation.test_examples=300", "data.max_length=32", "rounds=2"]
OWNER_KEY = "benchmark-owner-key"
MASTER_KEY = "benchmark-client-master-key"
THIEF = 3
ATTACKS = {
    "int8 quantization": [{"quantize": 8}],
    "int4 quantization": [{"quantize": 4}],
    "top-k pruning, keep 50%": [{"topk": 0.5}],
    "top-k pruning, keep 20%": [{"topk": 0.2}],
}
START, END = "<!-- ip-benchmark:start -->", "<!-- ip-benchmark:end -->"


def experiments(overrides: list[str]):
    raw = yaml.safe_load(CONFIG.read_text())
    plain = {k: v for k, v in copy.deepcopy(raw).items() if k != "server_steps"}
    plain["name"] = "quickstart-plain"
    return from_dict(plain, "plain", overrides), from_dict(raw, str(CONFIG), overrides)


def run_job(exp, out: Path, wb) -> tuple[dict, list[dict], dict]:
    rt = LocalRuntime(exp, out, progress=False, workbench=wb)
    summary = rt.run()
    return summary, read_metrics(out / "metrics.jsonl"), wb.full_state(rt.final_state)


def fmt_p(p: float) -> str:
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ip"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("-o", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = JOB + [f"runtime.threads={args.threads}"] + args.overrides
    os.environ["FEDFM_WATERMARK_KEY"] = OWNER_KEY  # the example reads its key from here
    t_start = time.perf_counter()
    exp_plain, exp_wm = experiments(overrides)
    wb = Workbench(exp_wm)
    base = Base(wb.model, wb.task, exp_wm.model.task, wb.tokenizer)
    spec = trigger_spec(exp_wm)
    step = next(s for s in exp_wm.server_steps if s["name"] == "waffle")
    owner_triggers = trigger_set(OWNER_KEY, spec, wb.tokenizer)
    cids = list(range(exp_wm.federation.clients))

    def owner(state):
        set_state(wb.model, state)
        return verdict(wb.task, spec, wb.model, wb.tokenizer, owner_triggers)

    test_labels = [b["labels"] for b in wb.eval_batches()]
    majority = max(torch.bincount(torch.cat(test_labels)).tolist()) / sum(len(t) for t in test_labels)
    print(f"majority-class rate of the test set: {majority:.4f}")
    s_plain, _, plain = run_job(exp_plain, args.out / "plain", wb)
    s_wm, rows_wm, marked = run_job(exp_wm, args.out / "waffle", wb)
    acc_plain, acc_wm = s_plain["final"]["accuracy"], s_wm["final"]["accuracy"]
    v_plain, v_wm = owner(plain), owner(marked)
    per_round = [(r["round"], r["waffle.wm_accuracy"], r["waffle.steps"], r["waffle.seconds"]) for r in rows_wm if "waffle.steps" in r]
    print(f"clean accuracy: without WAFFLE {acc_plain:.4f}, with {acc_wm:.4f}")
    print(f"owner key on the watermarked model: {v_wm.hits}/{v_wm.total}, p {v_wm.p_value:.2e}; on the plain one: {v_plain.hits}/{v_plain.total}, p {v_plain.p_value:.3g}")
    print("WAFFLE per round (round, wm accuracy, steps, seconds):", per_round)

    settings = WaffleParams(**{k: v for k, v in step.items() if k != "name"}).settings()  # the copies embed as WAFFLE does
    copies, costs, traced, clean_copies = {}, [], 0, []
    shared_names = {k for k in marked if not any(fnmatch.fnmatchcase(k, p) for p in exp_wm.peft.local)}
    for cid in cids:
        res = client_copy(base, marked, MASTER_KEY, cid, spec, settings, seed=exp_wm.seed)
        copies[cid] = res.state
        nbytes = len(to_bytes(Payload({k: res.state[k] for k in sorted(shared_names)})))
        found = trace(base, res.state, MASTER_KEY, cids, spec)
        traced += int(found.suspect == cid)
        clean = wb.evaluate(res.state)["accuracy"]
        clean_copies.append(clean)
        costs.append((cid, res.steps, res.seconds, nbytes, res.accuracy, found.suspect, found.p_value, clean))
        print(f"client {cid}: {res.steps} steps, {res.seconds:.1f} s, {nbytes:,} B, own wm {res.accuracy:.2f}, "
              f"traced to {found.suspect} (p {found.p_value:.2e}), clean accuracy {clean:.4f}")
    trace_acc = traced / len(cids)
    print(f"tracing accuracy over {len(cids)} clients: {trace_acc:.3f}")

    leaked = copies[THIEF]
    thief_data = [e for c in cids for e in wb.examples(c)]
    attacked = {"none (the leaked copy)": leaked}
    for epochs in (1, 3):
        train = exp_wm.train.model_copy(update={"epochs": epochs, "steps": None})
        attacked[f"fine-tune {epochs} epoch{'s' if epochs > 1 else ''} on {len(thief_data)} clean reviews"] = fine_tune(
            base, leaked, thief_data, train, seed=exp_wm.seed)[0]
    for name, specs in ATTACKS.items():
        attacked[name] = codec_roundtrip(leaked, specs, seed=exp_wm.seed)[0]
    attack_rows = []
    for name, state in attacked.items():
        clean = wb.evaluate(state)["accuracy"]
        v = owner(state)
        found = trace(base, state, MASTER_KEY, cids, spec)
        own = found.verdicts[THIEF]
        attack_rows.append((name, clean, v, own, found.suspect))
        print(f"{name}: clean {clean:.4f}, WAFFLE {v.accuracy:.2f} (p {v.p_value:.2e}), thief key {own.accuracy:.2f} "
              f"(p {own.p_value:.2e}), traced to {found.suspect}")
    wall = time.perf_counter() - t_start
    print(f"total wall {wall:.0f} s")
    if not args.no_doc:
        write_doc(args, overrides, exp_wm, spec, settings, acc_plain, acc_wm, v_plain, v_wm, per_round, costs,
                  trace_acc, clean_copies, attack_rows, len(thief_data), wall, majority)


def write_doc(args, overrides, exp, spec, settings, acc_plain, acc_wm, v_plain, v_wm, per_round, costs, trace_acc,
              clean_copies, attack_rows, n_thief, wall, majority) -> None:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "PYTHONPATH=src nice -n 10 python benchmarks/ip.py" + "".join(f" -o {o}" for o in args.overrides)
    lines = [
        START,
        f"Measured {when} on the shared 2-core CPU machine ({args.threads} torch thread), total wall {wall:.0f} s:",
        "",
        f"```bash\n{cmd}\n```",
        "",
        f"Job: examples/ip/waffle.yaml with `{' '.join(overrides)}`: {exp.federation.clients} clients, "
        f"{exp.rounds} rounds. Trigger sets: {spec.size} sentences of {spec.length} random tokens, "
        f"{spec.num_labels} labels (chance {1 / spec.num_labels:g}); embedding: threshold {settings.threshold}, "
        f"budget {settings.max_steps} steps, AdamW lr {settings.lr}, batch {settings.batch_size}, "
        f"frozen {list(settings.freeze)}.",
        "",
        f"The test set's majority class is {majority:.1%} of it (a constant prediction scores {majority:.4f}).",
        "",
        "| model | clean accuracy | owner-key watermark accuracy | p-value |",
        "|---|---:|---:|---:|",
        f"| without WAFFLE | {acc_plain:.4f} | {v_plain.accuracy:.2f} ({v_plain.hits}/{v_plain.total}) | {fmt_p(v_plain.p_value)} |",
        f"| with WAFFLE | {acc_wm:.4f} | {v_wm.accuracy:.2f} ({v_wm.hits}/{v_wm.total}) | {fmt_p(v_wm.p_value)} |",
        "",
        "WAFFLE per round (metrics.jsonl `waffle.*`): "
        + "; ".join(f"round {r}: accuracy {a:.2f} after {s} steps, {sec:.1f} s" for r, a, s, sec in per_round) + ".",
        "",
        f"Client-unique copies of the watermarked final model: **tracing accuracy {trace_acc:.0%}** over "
        f"{len(costs)} clients; clean accuracy of the copies {min(clean_copies):.4f} to {max(clean_copies):.4f} "
        f"(mean {sum(clean_copies) / len(clean_copies):.4f}).",
        "",
        "| client | steps | server time (s) | bytes of its copy | own-key accuracy | traced to | p-value | clean accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cid, steps, sec, nbytes, acc, suspect, p, clean in costs:
        lines.append(f"| {cid} | {steps} | {sec:.1f} | {nbytes:,} | {acc:.2f} | {suspect} | {fmt_p(p)} | {clean:.4f} |")
    lines += [
        "",
        f"The thief (client {THIEF}) attacks its copy; fine-tuning uses the job's train settings on "
        f"{n_thief} clean reviews (every client's training set).",
        "",
        "| attack | clean accuracy | WAFFLE watermark accuracy | p-value | thief's key accuracy | p-value | traced to |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, clean, v, own, suspect in attack_rows:
        lines.append(f"| {name} | {clean:.4f} | {v.accuracy:.2f} | {fmt_p(v.p_value)} | {own.accuracy:.2f} | {fmt_p(own.p_value)} | {suspect} |")
    lines.append(END)
    section = "\n".join(lines)
    doc = ROOT / "docs" / "ip.md"
    text = doc.read_text() if doc.exists() else f"# IP protection\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    doc.write_text(head + section + rest.split(END, 1)[1])
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
