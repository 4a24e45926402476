"""Runtime overhead of fedfm against a plain PyTorch loop doing the same work.

Runs one job (default: examples/quickstart.yaml) twice, each in its own subprocess so that
peak RSS is measured per run: once through fedfm's local runtime (``run_local``: sampling,
codec chains, validation, checkpoints, metrics) and once as a plain loop written here with
transformers + peft + torch only, on the same clients and examples (the split comes from
fedfm's data layer, the same in both), the same LoRA config and initialisation, the same
seeded batches and dropout masks, FedAvg by hand, and the same evaluations. Both runs
should end with the same accuracy: that is the check that they did the same work.

Prints wall time, CPU time (user + sys of the subprocess: less sensitive to other load on
a shared machine) and peak RSS of each, and the ratios fedfm / plain.

    PYTHONPATH=src python benchmarks/overhead.py [--config examples/quickstart.yaml] [--threads 2]
        [--repeat 1] [--parallel] [-o federation.examples_per_client=48 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def derive_seed(*keys: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0] >> 1)


# -- the two jobs (each runs in a child process) ------------------------------------------


def job_fedfm(exp) -> dict:
    from fedfm.runtime import run_local

    with tempfile.TemporaryDirectory() as out:
        summary = run_local(exp, out, progress=False)
    return {"accuracy": summary["final"].get("accuracy"), "loss": summary["final"].get("loss")}


def _collate(items, pad_id):
    import torch

    width = max(len(e["input_ids"]) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(items), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(items):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    return ids, mask, torch.tensor([e["label"] for e in items])


def job_plain(exp) -> dict:
    """FedAvg + LoRA in plain transformers / peft / torch (no fedfm runtime code)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fedfm.data import build_federation, load_source
    from fedfm.tasks.packages import resolve_package

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    directory = resolve_package(exp.model.package)
    torch.manual_seed(exp.seed)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=exp.model.num_labels)
    tok = AutoTokenizer.from_pretrained(directory)
    p = exp.peft.params()
    torch.manual_seed(derive_seed(exp.seed, 0xADA))
    cfg = LoraConfig(r=p["r"], lora_alpha=p["alpha"], lora_dropout=p.get("dropout", 0.0),
                     target_modules=list(p["target_modules"]), modules_to_save=["classifier"], bias="none")
    model = get_peft_model(model, cfg)
    model.eval()
    rows = sorted({i for c in fed.clients for i in c.indices} | set(fed.test_indices.tolist()))
    frame = fed.frame.iloc[rows]
    enc = tok(list(frame["text"].astype(str)), truncation=True, max_length=exp.data.max_length, padding=False)
    examples = {r: {"input_ids": ids, "label": int(y)} for r, ids, y in zip(rows, enc["input_ids"], frame["label"])}
    pad = tok.pad_token_id or 0
    test = sorted((examples[i] for i in fed.test_indices.tolist()), key=lambda e: len(e["input_ids"]))
    bs = exp.eval.batch_size
    test_batches = [_collate(test[i : i + bs], pad) for i in range(0, len(test), bs)]
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    glob = {n: q.detach().clone() for n, q in params.items()}

    @torch.no_grad()
    def evaluate():
        for n, q in params.items():
            q.copy_(glob[n])
        correct = total = 0
        loss = 0.0
        for ids, mask, y in test_batches:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, C)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            total += len(y)
        return {"accuracy": correct / total, "loss": loss / total}

    tr = exp.train
    result = evaluate()
    for rnd in range(1, exp.rounds + 1):
        deltas, weights = [], []
        for c in fed.clients:
            with torch.no_grad():
                for n, q in params.items():
                    q.copy_(glob[n])
            data = [examples[i] for i in c.indices]
            seed = derive_seed(exp.seed, rnd, c.cid)
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            opt = torch.optim.AdamW(list(params.values()), lr=tr.lr, weight_decay=tr.weight_decay)
            total_steps = tr.steps or -(-len(data) // tr.batch_size) * tr.epochs
            model.train()
            step = 0
            while step < total_steps:
                order = torch.randperm(len(data), generator=gen).tolist()
                for s in range(0, len(order), tr.batch_size):
                    ids, mask, y = _collate([data[i] for i in order[s : s + tr.batch_size]], pad)
                    loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.float(), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(list(params.values()), tr.max_grad_norm)
                    opt.step()
                    step += 1
                    if step >= total_steps:
                        break
            model.eval()
            deltas.append({n: q.detach() - glob[n] for n, q in params.items()})
            weights.append(float(len(data)))
        w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        for n in glob:
            acc = torch.zeros_like(glob[n], dtype=torch.float64)
            for wi, d in zip(w.tolist(), deltas):
                acc.add_(d[n].to(torch.float64), alpha=wi)
            glob[n] = glob[n] + acc.to(glob[n].dtype)
        result = evaluate()
    return result


def child(mode: str, config: str, threads: int, out: str, overrides: list[str]) -> None:
    import torch

    from fedfm.config import load_config

    torch.set_num_threads(threads)
    exp = load_config(config, [*overrides, f"runtime.threads={threads}", "runtime.progress=false"])
    t0 = time.perf_counter()
    result = (job_fedfm if mode == "fedfm" else job_plain)(exp)
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    Path(out).write_text(json.dumps(result))


# -- the parent: run both, print ratios ----------------------------------------------------


def start(mode: str, config: str, threads: int, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--child", mode, "--config", config, "--threads", str(threads), "--result", out]
    cmd += [f"--override={o}" for o in overrides]
    return subprocess.Popen(cmd), out


def finish(proc: subprocess.Popen, out: str) -> dict:
    """Wait for one child; its own CPU time comes from wait4's resource usage."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed with exit code {proc.returncode}")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def measure_pair(order: tuple[str, str], args) -> dict[str, dict]:
    """Both modes, one after the other, or at the same time with ``--parallel`` (then both
    see the same load from the rest of the machine)."""
    if args.parallel:
        started = {m: start(m, args.config, args.threads, args.override) for m in order}
        return {m: finish(*started[m]) for m in order}
    return {m: finish(*start(m, args.config, args.threads, args.override)) for m in order}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/quickstart.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs (fedfm, plain alternating)")
    ap.add_argument("--parallel", action="store_true", help="run fedfm and plain at the same time")
    ap.add_argument("--override", "-o", action="append", default=[], help="dotted config override")
    ap.add_argument("--child", choices=["fedfm", "plain"])
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.config, args.threads, args.result, args.override)
        return
    runs: dict[str, list[dict]] = {"fedfm": [], "plain": []}
    for i in range(args.repeat):
        pair = measure_pair(("fedfm", "plain") if i % 2 == 0 else ("plain", "fedfm"), args)
        for mode, r in pair.items():
            runs[mode].append(r)
            print(f"{mode:>6}: wall {r['wall_s']:.1f}s  cpu {r['cpu_s']:.1f}s  peak RSS {r['peak_rss_mb']:.0f} MB  "
                  f"accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}", flush=True)
    best = {m: {k: min(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_mb")} for m, rs in runs.items()}
    f, p = best["fedfm"], best["plain"]
    print(f"ratio fedfm/plain (best of {args.repeat}): wall {f['wall_s'] / p['wall_s']:.3f}  "
          f"cpu {f['cpu_s'] / p['cpu_s']:.3f}  peak RSS {f['peak_rss_mb'] / p['peak_rss_mb']:.3f}")
    same = runs["fedfm"][0]["accuracy"] == runs["plain"][0]["accuracy"]
    print(f"same final accuracy: {same} ({runs['fedfm'][0]['accuracy']:.4f} vs {runs['plain'][0]['accuracy']:.4f})")


if __name__ == "__main__":
    main()
