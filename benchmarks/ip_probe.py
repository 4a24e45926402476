"""Probe: embed a watermark into one trained model, then let a thief fine-tune it.

    PYTHONPATH=src nice -n 10 python benchmarks/ip_probe.py [--model runs/ip-full2/plain]
        [--set "trigger=pattern,patterns=64,lr=1e-3,preserve=5"] [--set ...] [--threads 1]

A fast way to compare embedding settings without a federated run (docs/ip.md, "Probe").
For each ``--set`` (comma-separated ``key=value``; the keys are ``PROBE``'s), on the same
loaded model (MODEL: a run directory with final.safetensors and config.yaml, by default the
plain full-quickstart run of ``benchmarks/ip.py --full``):

1. the clean test accuracy of MODEL and its watermark votes/hits on the owner's key;
2. ``ip.embed`` of the key's trigger set (random or pattern triggers, ``ip/trigger.py``)
   with the set's lr, threshold, step budget and ``preserve`` weight (0: none; public text:
   English fortunes, as in the examples), head frozen as in ``waffle`` (``freeze``: more
   fnmatch patterns left unchanged, ``|``-separated; ``random_texts``: ``preserve``'s
   random-token sentences; ``seed``: the embedding's and the thief's seed, -1 = the
   job's; ``public``: ``fortunes`` or ``reviews``, MODEL's own source with every text its
   job uses excluded, ``preserve.exclude_run``; ``keep_batch``: its texts per step; ``recenter``: ``preserve.recenter``): steps, clean
   accuracy and watermark after;
3. the thief's fine-tune of the marked model (``ip/removal.fine_tune``) on every client's
   training examples of MODEL's job, for ``epochs`` epochs with the job's train settings:
   clean accuracy and the watermark that survives (hits, items, binomial p-value; for
   pattern triggers one majority vote per pattern, ``ip/verify.py``).

``embed=0`` skips step 2 and attacks MODEL as it is (e.g. a watermarked run's final model).
``copy=CID`` adds, before the attack, ``client_watermark``'s embedding for client CID: its
own random key (``copy_size`` triggers, ``benchmarks/ip.py``'s master key) together with
the owner's set, at ``copy_lr`` / ``copy_steps`` / ``copy_threshold`` (the example's 2e-3 /
120 / 0.95), and reports the copy's figures and its own key after the attack.
It prints one line per step and a JSON line per setting (``PROBE-RESULT {...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file  # noqa: E402

from fedfm.config import load_config  # noqa: E402
from fedfm.ip import Base, EmbedSettings, TriggerSpec, client_key, embed, trigger_set, verdict  # noqa: E402
from fedfm.ip.embed import HEAD_PATTERNS  # noqa: E402
from fedfm.ip.preserve import PreserveParams, build_preserver  # noqa: E402
from fedfm.ip.removal import fine_tune  # noqa: E402
from fedfm.peft import set_state  # noqa: E402
from fedfm.runtime.workbench import Workbench  # noqa: E402

OWNER_KEY = "benchmark-owner-key"  # benchmarks/ip.py's
MASTER_KEY = "benchmark-client-master-key"  # benchmarks/ip.py's
PUBLIC = {"fortunes": {"source": "fortunes", "options": {"languages": ["en"]}},  # Debian's English fortunes
          "reviews": {"source": "rotten_tomatoes"}}  # MODEL's own source, every text its job uses excluded
PROBE = {  # every setting's defaults: the waffle step of examples/ip/waffle.yaml
    "trigger": "random", "size": 50, "length": 12, "patterns": 64, "pattern_tokens": 3, "fillers": 4,
    "lr": 1e-3, "threshold": 0.98, "max_steps": 100, "batch": 16, "preserve": 5.0, "epochs": 1, "embed": 1,
    "key": OWNER_KEY, "freeze": "", "random_texts": 0, "seed": -1, "public": "fortunes", "keep_batch": 16, "recenter": 0,
    "copy": -1, "copy_lr": 2e-3, "copy_steps": 120, "copy_threshold": 0.95, "copy_size": 32,
}


def parse(text: str) -> dict:
    out = dict(PROBE)
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        if k not in PROBE:
            raise SystemExit(f"--set: unknown key '{k}'; known: {sorted(PROBE)}")
        out[k] = type(PROBE[k])(v) if not isinstance(PROBE[k], float) else float(v)
    return out


def public_params(s: dict) -> PreserveParams:
    """``preserve``'s section for setting ``s``: its public text (``public``), weight and random texts."""
    if s["public"] not in PUBLIC:
        raise SystemExit(f"--set public={s['public']}: known: {sorted(PUBLIC)}")
    return PreserveParams(data=PUBLIC[s["public"]], weight=s["preserve"], random_texts=s["random_texts"],
                          batch_size=s["keep_batch"], exclude_run=s["public"] == "reviews",
                          recenter=bool(s["recenter"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("/work/main/runs/ip-full2/plain"))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exp = load_config(args.model / "config.yaml").model_copy()
    exp = exp.model_copy(update={"runtime": exp.runtime.model_copy(update={"threads": args.threads})})
    wb = Workbench(exp)
    base = Base(wb.model, wb.task, exp.model.task, wb.tokenizer)
    shared = load_file(str(args.model / "final.safetensors"))
    start_state = wb.full_state(shared)
    thief_data = [e for c in range(exp.federation.clients) for e in wb.examples(c)]
    clean0 = wb.evaluate(start_state)["accuracy"]
    print(f"model {args.model}: clean accuracy {clean0:.4f}; thief data {len(thief_data)} examples", flush=True)
    for text in args.sets or [""]:
        s = parse(text)
        seed = exp.seed if s["seed"] < 0 else s["seed"]  # the embedding's and the thief's (-1: the job's)
        t0 = time.perf_counter()
        spec = TriggerSpec(exp.model.task, s["size"], s["length"], exp.model.num_labels, 4, s["trigger"],
                           s["patterns"], s["pattern_tokens"], s["fillers"])
        triggers = trigger_set(s["key"], spec, wb.tokenizer)

        def check(state):
            set_state(wb.model, state)
            return verdict(wb.task, spec, wb.model, wb.tokenizer, triggers)

        before = check(start_state)
        row = {"set": text, **s, "clean_before": clean0, "wm_before": [before.hits, before.total, before.p_value]}
        marked = start_state
        if s["embed"]:
            keep = None
            if s["preserve"] > 0:
                keep = build_preserver(public_params(s),
                                       wb.task, wb.tokenizer, seed=1 if s["seed"] < 0 else seed + 1,
                                       length=s["length"], run=exp)
            result = embed(wb.model, wb.task, exp.model.task, wb.tokenizer, start_state, triggers,
                           EmbedSettings(s["threshold"], s["max_steps"], s["lr"], s["batch"],
                                         HEAD_PATTERNS + tuple(filter(None, s["freeze"].split("|"))), keep),
                           seed=seed, train_names=set(shared))
            marked = result.state
            after = check(marked)
            row.update(steps=result.steps, trigger_accuracy=result.accuracy, clean_marked=wb.evaluate(marked)["accuracy"],
                       wm_marked=[after.hits, after.total, after.p_value], embed_s=round(result.seconds, 1))
            print(f"[{text}] embedded: {result.steps} steps, trigger accuracy {result.accuracy:.3f}, clean "
                  f"{row['clean_marked']:.4f}, watermark {after.hits}/{after.total} p {after.p_value:.2e}", flush=True)
        own = own_check = None
        if s["copy"] >= 0:  # client_watermark's embedding for one client: its own random key + the owner's set
            own = trigger_set(client_key(MASTER_KEY, s["copy"]), TriggerSpec(exp.model.task, s["copy_size"], s["length"],
                              exp.model.num_labels), wb.tokenizer)
            keep = build_preserver(public_params(s),
                                   wb.task, wb.tokenizer, seed=seed + 2, length=s["length"], run=exp) if s["preserve"] > 0 else None
            result = embed(wb.model, wb.task, exp.model.task, wb.tokenizer, marked, own + triggers,
                           EmbedSettings(s["copy_threshold"], s["copy_steps"], s["copy_lr"], s["batch"], HEAD_PATTERNS, keep),
                           seed=seed + 3, train_names=set(shared))
            marked = result.state

            def own_check(state):
                set_state(wb.model, state)
                return verdict(wb.task, TriggerSpec(exp.model.task, s["copy_size"], s["length"], exp.model.num_labels),
                               wb.model, wb.tokenizer, own)

            o, w = own_check(marked), check(marked)
            row.update(copy_steps_taken=result.steps, clean_copy=wb.evaluate(marked)["accuracy"], own_copy=[o.hits, o.total, o.p_value],
                       wm_copy=[w.hits, w.total, w.p_value])
            print(f"[{text}] client {s['copy']}'s copy: {result.steps} steps, clean {row['clean_copy']:.4f}, own key "
                  f"{o.hits}/{o.total}, owner {w.hits}/{w.total}", flush=True)
        train = exp.train.model_copy(update={"epochs": s["epochs"], "steps": None})
        stolen = fine_tune(base, marked, thief_data, train, seed=seed)[0]
        survived = check(stolen)
        if own_check is not None:
            o = own_check(stolen)
            row["own_stolen"] = [o.hits, o.total, o.p_value]
            print(f"[{text}] the copy's own key after the thief: {o.hits}/{o.total} p {o.p_value:.2e}", flush=True)
        row.update(clean_stolen=wb.evaluate(stolen)["accuracy"], wm_stolen=[survived.hits, survived.total, survived.p_value],
                   seconds=round(time.perf_counter() - t0, 1))
        print(f"[{text}] after the thief's {s['epochs']}-epoch fine-tune: clean {row['clean_stolen']:.4f}, watermark "
              f"{survived.hits}/{survived.total} p {survived.p_value:.2e} ({row['seconds']} s)", flush=True)
        print("PROBE-RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
