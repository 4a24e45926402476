"""The tables and the recommendation of benchmarks/robustness.py, built from its results
(one dict per attack x defense x seed cell), and the writer of docs/robustness.md's blocks."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def merge_seeds(results: list[dict]) -> list[dict]:
    """One row per (attack, defense): the mean over its seeds of every per-round accuracy,
    the ASRs and the wall time (a cell refused or failed for any seed stays an error row).
    ``seeds`` counts them; ``final_min`` is the lowest final accuracy over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["attack"], r["defense"]), []).append(r)
    merged = []
    for rows in groups.values():
        bad = [r for r in rows if "error" in r]
        if bad or len(rows) == 1:
            merged.append(bad[0] if bad else {**rows[0], "seeds": 1, "final_min": rows[0]["accuracy"][-1]})
            continue
        n = len(rows)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out = {**rows[0], "seeds": n, "seed": [r.get("seed", 0) for r in rows]}
        out["accuracy"] = [mean(col) for col in zip(*(r["accuracy"] for r in rows))]
        out["asr"] = mean([r["asr"] for r in rows])
        out["wall_s"] = mean([r["wall_s"] for r in rows])
        out["final_min"] = min(r["accuracy"][-1] for r in rows)
        if all("asr_rounds" in r for r in rows):
            out["asr_rounds"] = [mean(col) for col in zip(*(r["asr_rounds"] for r in rows))]
        merged.append(out)
    return merged


def table(results: list[dict], attacks: list[str], defenses: list[str]) -> str:
    cell = {(r["attack"], r["defense"]): r for r in results}
    head = ["defense \\ attack"] + [a if not a.startswith("backdoor") else f"{a} (acc / ASR)" for a in attacks] + ["clean ASR", "wall s (none)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in defenses:
        row = [d]
        for a in attacks:
            r = cell.get((a, d))
            if r is None:
                row.append("not run")
            elif "error" in r:
                row.append("refused" if "refused" in r["error"] else "failed")
            elif a.startswith("backdoor"):
                row.append(f"{r['accuracy'][-1]:.3f} ({r['accuracy'][-2]:.3f}) / {r['asr']:.2f}")
            else:
                row.append(f"{r['accuracy'][-1]:.3f} ({r['accuracy'][-2]:.3f})")
        clean = cell.get(("none", d))
        row.append(f"{clean['asr']:.2f}" if clean and "error" not in clean else "-")
        row.append(f"{clean['wall_s']:.0f}" if clean and "error" not in clean else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def recommend(results: list[dict], defenses: list[str], attacks: list[str], untargeted: list[str]) -> str:
    """Each defense's worst drop and backdoor ASR over ``attacks`` (every attack of the matrix) and
    ``untargeted`` (the untargeted ones), then the recommended rule."""
    cell = {(r["attack"], r["defense"]): r for r in results if "error" not in r}
    lines = []
    best = None
    untargeted = [a for a in untargeted if any((a, d) in cell for d in defenses)]  # the ones this matrix ran
    for d in defenses:
        clean = cell.get(("none", d))
        if clean is None:
            continue
        drops = {a: clean["accuracy"][-1] - cell[(a, d)]["accuracy"][-1] for a in untargeted if (a, d) in cell}
        backdoors = [cell[(a, d)]["asr"] for a in attacks if a.startswith("backdoor") and (a, d) in cell]
        if len(drops) < len(untargeted) or not backdoors:
            continue
        worst = max(drops.values())
        asr = max(backdoors)
        ok = worst <= 0.02 and asr <= 0.10
        # tie-break: the worst drop one round earlier, over every attack (backdoors included)
        earlier = max(
            clean["accuracy"][-2] - cell[(a, d)]["accuracy"][-2] for a in attacks if a != "none" and not a.startswith("compromised_base") and (a, d) in cell
        )
        which = f" ({max(drops, key=drops.get)})" if worst > 0 else ""
        lines.append(
            f"- {d}: clean {clean['accuracy'][-1]:.3f}, worst final drop {100 * worst:.1f} points{which}, worst backdoor ASR {asr:.2f}, "
            f"worst drop a round earlier {100 * earlier:.1f} points{' - meets the goal' if ok else ''}"
        )
        key = (not ok, round(worst, 6), round(asr, 6), round(earlier, 6), -clean["accuracy"][-1])
        if best is None or key < best[0]:
            best = (key, d)
    if best is not None and not best[0][0]:
        lines.append(f"\nRecommended (meets the goal; then the fewest final points lost to an untargeted attack, the lowest backdoor ASR, the fewest points lost a round earlier to any attack): **{best[1]}**.")
    elif best is not None:
        lines.append(f"\nNo rule meets the goal (<= 2 points lost to every untargeted attack and backdoor ASR <= 0.10). Closest (the fewest final points lost to an untargeted attack, then the lowest backdoor ASR): **{best[1]}**.")
    return "\n".join(lines) if lines else "No defense has every cell yet."


def write_doc(text: str, marker: str) -> None:
    """Replace the block between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` of docs/robustness.md."""
    doc = ROOT / "docs" / "robustness.md"
    if not doc.exists():
        print("docs/robustness.md does not exist; not written")
        return
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    body = doc.read_text()
    if start not in body:
        print(f"docs/robustness.md has no {start} marker; not written")
        return
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def compromised_table(results: list[dict], defenses: list[str], attacks: list[str]) -> str:
    """Per planting and defense: the planted backdoor's ASR before federation and after
    every round, and the clean accuracy (honest clients only: no update is malicious)."""
    cell = {(r["attack"], r["defense"]): r for r in results if r["attack"].startswith("compromised_base")}
    rounds = max((len(r.get("asr_rounds", [])) for r in cell.values()), default=1) - 1
    head = ["base model", "defense", "ASR r0"] + [f"ASR r{i}" for i in range(1, rounds + 1)] + ["accuracy r0 -> last", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in (a for a in attacks if a.startswith("compromised_base")):
        for d in defenses:
            r = cell.get((a, d))
            if r is None:
                continue
            label = "planted, head kept" if a == "compromised_base" else "planted, new head"
            if "error" in r:
                word = "refused" if "refused" in r["error"] else "failed"
                lines.append(f"| {label} | {d} | " + " | ".join([word] * (len(head) - 2)) + " |")
                continue
            asr = [f"{x:.2f}" for x in r["asr_rounds"]]
            lines.append(f"| {label} | {d} | " + " | ".join(asr) + f" | {r['accuracy'][0]:.3f} -> {r['accuracy'][-1]:.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)
