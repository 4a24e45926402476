"""The FedPEFT communication table: every method of examples/peft/ on the quickstart job.

For each method (same data, clients and rounds; the learning rate of its example config):
trainable parameters, their share of the full model, bytes sent up per client per round
(measured: ``bytes_up / len(clients)`` of metrics.jsonl, i.e. ``len()`` of the encoded
payloads), that as a share of full fine-tuning's bytes, accuracy before and after
training, and wall time relative to LoRA. Each finished method is saved as JSON under
``--out``, so an interrupted benchmark resumes, and ``--table-only`` reprints the table.

    PYTHONPATH=src python benchmarks/peft_table.py                  # all methods, ~40 min
    PYTHONPATH=src python benchmarks/peft_table.py --methods lora,bitfit -o rounds=1

``slora`` is a stages file (examples/peft/slora.yaml: 1 sparse round, then 2 LoRA rounds
from the SVD of its update): one row over both stages, its trainable column giving both
stages' counts; ``-o`` overrides apply to every stage.

Wall times are only comparable within one invocation on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "peft"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
METHODS = [
    "lora", "full", "bitfit", "salience", "adapter_houlsby", "adapter_pfeiffer",
    "prompt_tuning", "prefix_tuning", "p_tuning", "ffa_lora", "ia3", "slora", "feature_attention",
]
FAMILY = {
    "full": "baseline", "bitfit": "selective", "salience": "selective",
    "adapter_houlsby": "additive", "adapter_pfeiffer": "additive", "prompt_tuning": "additive",
    "prefix_tuning": "additive", "p_tuning": "additive",
    "lora": "reparameterization", "ffa_lora": "reparameterization", "ia3": "reparameterization",
    "slora": "reparameterization", "feature_attention": "additive",
}
STAGED = {"slora"}  # stages files: their rounds add up to the quickstart's
SHARED_KEYS = ("seed", "rounds", "model", "data", "federation", "codecs", "aggregator")


def load_method(name: str, overrides: list[str], threads: int):
    from fedfm.config import load_config

    extra = [f"runtime.threads={threads}", "runtime.progress=false"]
    exp = load_config(EXAMPLES / f"{name}.yaml", overrides + extra)
    ref = load_config(QUICKSTART, overrides + extra)
    for key in SHARED_KEYS:
        if getattr(exp, key) != getattr(ref, key):
            raise SystemExit(f"examples/peft/{name}.yaml: '{key}' differs from the quickstart job")
    return exp


def load_stages_method(name: str, overrides: list[str], threads: int, out: Path):
    """The stages of a staged method, each checked against the quickstart job (rounds summed)."""
    from fedfm.config import load_config
    from fedfm.stages import load_stages

    extra = [f"runtime.threads={threads}", "runtime.progress=false"]
    _, stages = load_stages(EXAMPLES / f"{name}.yaml", out / "runs" / name, overrides + extra)
    ref = load_config(QUICKSTART, overrides + extra)
    for key in SHARED_KEYS:
        def value(exp):  # the chain sets model.init_from of every stage after the first
            return exp.model.model_copy(update={"init_from": None}) if key == "model" else getattr(exp, key)

        same = (sum(st.exp.rounds for st in stages) == ref.rounds if key == "rounds"
                else all(value(st.exp) == value(ref) for st in stages))
        if not same:
            raise SystemExit(f"examples/peft/{name}.yaml: '{key}' differs from the quickstart job")
    return stages


def run_staged(name: str, overrides: list[str], threads: int, out: Path) -> dict:
    """A stages file (SLoRA: sparse, then LoRA): the rounds of every stage in one row; round 0
    is the first stage's, the final accuracy the last stage's; bytes averaged over all rounds."""
    from fedfm.peft import count_params
    from fedfm.runtime import LocalRuntime

    stages = load_stages_method(name, overrides, threads, out)
    t0 = time.perf_counter()
    rows, trainable = [], []
    for i, st in enumerate(stages):
        rt = LocalRuntime(st.exp, st.out, progress=False, overwrite=True)
        rt.run()
        trainable.append(count_params(rt.wb.model)[0])
        stage_rows = [json.loads(line) for line in (st.out / "metrics.jsonl").read_text().splitlines()]
        rows += stage_rows if i == 0 else stage_rows[1:]  # a later stage's round 0 is the previous final model
        del rt
        gc.collect()
    wall = time.perf_counter() - t0
    per_client = [r["bytes_up"] / len(r["clients"]) for r in rows if r["round"] >= 1 and r["clients"]]
    return {
        "method": name, "peft": [st.exp.peft.model_dump() for st in stages], "lr": stages[-1].exp.train.lr,
        "overrides": overrides, "trainable": trainable[-1],
        "trainable_text": " then ".join(f"{t:,}" for t in trainable), "base_params": base_model_params(stages[0].exp),
        "bytes_up_per_client_round": sum(per_client) / len(per_client),
        "accuracy": [r.get("accuracy") for r in rows], "loss": [r["loss"] for r in rows if r.get("loss") is not None],
        "wall_s": wall, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def base_model_params(exp) -> int:
    from fedfm.tasks import build_task

    model, _ = build_task(exp.model.task).build(exp.model, exp.seed)
    return sum(p.numel() for p in model.parameters())


def run_method(name: str, overrides: list[str], threads: int, out: Path) -> dict:
    from fedfm.peft import count_params
    from fedfm.runtime import LocalRuntime

    if name in STAGED:
        return run_staged(name, overrides, threads, out)
    exp = load_method(name, overrides, threads)
    t0 = time.perf_counter()
    rt = LocalRuntime(exp, out / "runs" / name, progress=False, overwrite=True)  # the benchmark's own folder
    summary = rt.run()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    per_client = [r["bytes_up"] / len(r["clients"]) for r in rows if r["round"] >= 1 and r["clients"]]
    trainable, _ = count_params(rt.wb.model)
    result = {
        "method": name,
        "peft": exp.peft.model_dump(),
        "lr": exp.train.lr,
        "overrides": overrides,
        "trainable": trainable,
        "base_params": base_model_params(exp),
        "bytes_up_per_client_round": sum(per_client) / len(per_client),
        "accuracy": [r.get("accuracy") for r in rows],
        "wall_s": wall,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    del rt, summary
    gc.collect()
    return result


def partial_result(name: str, overrides: list[str], threads: int, out: Path) -> dict | None:
    """The row of a run still in progress (or stopped): its metrics so far; the
    trainable count from building the tuned model (no training)."""
    from fedfm.peft import apply_tuner, count_params
    from fedfm.tasks import build_task

    path = out / "runs" / name / "metrics.jsonl"
    if name in STAGED:
        return None  # a stages file's rows are complete or absent
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    trained = [r for r in rows if r["round"] >= 1 and r["clients"]]
    if not trained:
        return None
    exp = load_method(name, overrides, threads)
    model, _ = build_task(exp.model.task).build(exp.model, exp.seed)
    base = sum(p.numel() for p in model.parameters())
    trainable, _ = count_params(apply_tuner(model, exp.peft, exp.model.task))
    return {
        "method": name, "lr": exp.train.lr, "overrides": overrides, "trainable": trainable, "base_params": base,
        "bytes_up_per_client_round": sum(r["bytes_up"] / len(r["clients"]) for r in trained) / len(trained),
        "accuracy": [r.get("accuracy") for r in rows if r.get("accuracy") is not None],
        "rounds_done": len(trained), "wall_s": None,
    }


def parse_methods(text: str) -> list[str]:
    """``--methods`` as a list; an unknown name stops the benchmark with the known ones."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    return names


def majority_rate(exp) -> float:
    """Accuracy of always predicting the test set's most frequent label."""
    from fedfm.data import build_federation, load_source

    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    labels = fed.frame.iloc[fed.test_indices]["label"]
    return float(labels.value_counts(normalize=True).max())


def table(results: dict[str, dict]) -> str:
    lora_wall = results.get("lora", {}).get("wall_s")
    full_bytes = results.get("full", {}).get("bytes_up_per_client_round")
    lines = [
        "| method | family | lr | trainable params | % of model | bytes up / client / round | % of full FT bytes | accuracy r0 -> final | test loss r0 -> final | wall vs LoRA |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for name in [m for m in METHODS if m in results]:
        r = results[name]
        acc = r["accuracy"]
        final = f"{acc[-1]:.3f}" if len(acc) > 1 else f"(round {r['rounds_done']} of 3, not evaluated)"
        pct_bytes = f"{100 * r['bytes_up_per_client_round'] / full_bytes:.3f}%" if full_bytes else "n/a"
        wall = f"{r['wall_s'] / lora_wall:.2f}x" if lora_wall and r["wall_s"] else "n/a"
        loss = r.get("loss") or []
        loss_txt = f"{loss[0]:.3f} -> {loss[-1]:.3f}" if len(loss) > 1 else "n/a"
        lines.append(
            f"| {name} | {FAMILY[name]} | {r['lr']:g} | {r.get('trainable_text') or format(r['trainable'], ',')} "
            f"| {100 * r['trainable'] / r['base_params']:.3f}% "
            f"| {r['bytes_up_per_client_round']:,.0f} | {pct_bytes} | {acc[0]:.3f} -> {final} | {loss_txt} | {wall} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "peft_table")
    ap.add_argument("-o", "--override", action="append", default=[], help="dotted override for every method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="print the table of the saved results")
    ap.add_argument("--partial", action="store_true", help="with --table-only: add runs still in progress")
    ap.add_argument("--rerun", action="store_true", help="run methods that already have a result")
    args = ap.parse_args()
    names = parse_methods(args.methods)
    res_dir = args.out / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for name in names:
            path = res_dir / f"{name}.json"
            if path.exists() and not args.rerun:
                continue
            result = run_method(name, args.override, args.threads, args.out)
            path.write_text(json.dumps(result, indent=1))
            print(f"{name}: accuracy {result['accuracy'][0]:.3f} -> {result['accuracy'][-1]:.3f}, "
                  f"{result['bytes_up_per_client_round']:,.0f} B/client/round, {result['wall_s']:.0f}s", flush=True)
    results = {p.stem: json.loads(p.read_text()) for p in sorted(res_dir.glob("*.json"))}
    results = {k: v for k, v in results.items() if k in names or args.table_only}
    if args.table_only and args.partial:
        for name in [m for m in names if m not in results]:
            row = partial_result(name, args.override, args.threads, args.out)
            if row is not None:
                results[name] = row
    for name, r in results.items():
        path = args.out / "runs" / name / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            r["loss"] = [x["loss"] for x in rows if x.get("loss") is not None]
    print(table(results))
    from fedfm.config import load_config

    exp = load_config(QUICKSTART, args.override)
    print(f"\nmajority-class accuracy of the test set: {majority_rate(exp):.3f}")


if __name__ == "__main__":
    main()
