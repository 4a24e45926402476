"""The tables of benchmarks/privacy.py, built from its rows, and the writer of
docs/privacy.md's marked blocks (``<!-- marker -->`` ... ``<!-- /marker -->``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def secagg_round_table(rows: list[dict]) -> str:
    lines = ["| run | clients per round | bytes up / round | bytes down / round | round wall s | accuracy | max abs diff to plain (same clients) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        lines.append(f"| {r['run']} | {r['clients']} | {r['bytes_up']:,.0f} | {r['bytes_down']:,.0f} | {r['round_wall_s']:.2f} | "
                     f"{r['accuracy']:.3f} | {diff} |")
    lines += ["", "| run | phase | bytes down / round | bytes up / round | wall s / round |", "|---|---|---|---|---|"]
    for r in rows:
        train = {"down": r["bytes_down"] - sum(b["down"] for b in r["phases"].values()),
                 "up": r["bytes_up"] - sum(b["up"] for b in r["phases"].values())}
        for ph in ("secagg_advertise", "secagg_share", "secagg_route", "train", "secagg_mask", "secagg_unmask"):
            b = train if ph == "train" else r["phases"].get(ph)
            if ph not in r["wall"] and b is None:
                continue
            down, up = ("-", "-") if b is None else (f"{b['down']:,.0f}", f"{b['up']:,.0f}")
            name = "train (of which secagg_mask)" if ph == "secagg_mask" else ph
            lines.append(f"| {r['run']} | {name} | {down} | {up} | {r['wall'].get(ph, 0.0):.3f} |")
    return "\n".join(lines)


def write_block(marker: str, text: str) -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "privacy.md"
    body = doc.read_text()
    pattern = rf"<!-- {marker} -->.*<!-- /{marker} -->"
    if not re.search(pattern, body, flags=re.S):
        raise SystemExit(f"docs/privacy.md has no <!-- {marker} --> block")
    doc.write_text(re.sub(pattern, lambda m: f"<!-- {marker} -->\n{text}\n<!-- /{marker} -->", body, flags=re.S))
    print(f"wrote {doc} ({marker})", file=sys.stderr)


def table(dp: list[dict], labels: list[dict], sa: list[dict]) -> str:
    lines = ["| setting | target epsilon | clip | accuracy | epsilon spent | membership AUC | TPR@1%FPR | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in dp:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(f"| {r['setting']} | {r['target']} | {r['clip']} | {r['accuracy']:.3f} | {eps} | {r['auc']:.3f} | "
                     f"{r['tpr_at_1pct_fpr']:.3f} | {r['wall_s']:.1f} |")
    lines += ["", "| update seen by the attacker | fraction of labels recovered (iDLG, one example, one step) |", "|---|---|"]
    lines += [f"| {r['noise']} | {r['label_accuracy']:.2f} (of {r['n']}) |" for r in labels]
    if not sa:  # --full: no SecAgg rows
        return "\n".join(lines)
    lines += ["", "| payload | d | clients | dropped | SecAgg's own bytes up | bytes down | masked inputs up | plain float32 up "
              "| SecAgg compute s | plain fixed-point sum s | max abs error of the mean |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['payload']} | {r['d']} | {r['clients']} | {r['dropped']} | {r['bytes_up']:,} | {r['bytes_down']:,} | "
              f"{r['masked_up']:,} | {r['plain_bytes_up']:,} | {r['wall_s']:.3f} | {r['plain_s']:.4f} | {r['max_err']:.1e} |" for r in sa]
    return "\n".join(lines)


def attack_table(mia: list[dict], tokens: list[dict]) -> str:
    lines = ["| membership attack on the non-private run | reference models | AUC | TPR@1%FPR | wall s (reference runs) |", "|---|---|---|---|---|"]
    lines += [f"| {r['attack']} | {r['references']} | {r['auc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | {r['wall_s']:.1f} |" for r in mia]
    lines += ["", "| update seen by the attacker (client 0) | tokens recovered | true tokens | precision | recall |", "|---|---|---|---|---|"]
    lines += [f"| {r['update']} | {r['recovered']} | {r['true']} | {r['precision']:.3f} | {r['recall']:.3f} |" for r in tokens]
    return "\n".join(lines)
