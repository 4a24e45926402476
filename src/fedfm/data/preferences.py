"""Preference pairs for DPO (``model.objective: {name: dpo}``): the ``preferences`` source.

``data.path`` is a JSONL file with one pair per line: a prompt, the chosen answer and the
rejected answer (field names set by ``data.options``), optionally grouped by any field
(``data.group_column``, the natural owner, e.g. the client that wrote the pair). The table
has columns ``prompt``, ``chosen``, ``rejected``, ``text`` (= chosen) and ``group``.
``fedfm.data.builders pairs`` writes such a file from an installed corpus.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fedfm.data.sources import data_file, no_empty_cells, read_jsonl, register_source


class PreferenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_field: str = Field("prompt", description="the field holding the prompt")
    chosen_field: str = Field("chosen", description="the field holding the preferred answer")
    rejected_field: str = Field("rejected", description="the field holding the dispreferred answer")


def preferences(cfg: Any, options: PreferenceOptions) -> pd.DataFrame:
    path = data_file(cfg.path, "preferences", " (build one with `python -m fedfm.data.builders pairs`)")
    df = read_jsonl(path)
    fields = {"prompt": options.prompt_field, "chosen": options.chosen_field, "rejected": options.rejected_field}
    for key, name in fields.items():
        if name not in df.columns:
            raise ValueError(
                f"data.options.{key}_field: field '{name}' not in {path} (fields: {', '.join(map(str, df.columns))})"
            )
    for key, name in fields.items():
        no_empty_cells(df[name], f"data.options.{key}_field '{name}' of {path}", key if key == "prompt" else f"{key} answer")
    out = pd.DataFrame({key: df[name].astype(str).values for key, name in fields.items()})
    same = int((out["chosen"] == out["rejected"]).sum())
    if same:
        raise ValueError(f"data.path: {same} pair(s) of {path} have identical chosen and rejected answers")
    out["text"] = out["chosen"]
    if cfg.group_column is not None:
        if cfg.group_column not in df.columns:
            raise ValueError(f"data.group_column: field '{cfg.group_column}' not in {path}")
        no_empty_cells(df[cfg.group_column], f"data.group_column '{cfg.group_column}' of {path}", "group")
        out["group"] = df[cfg.group_column].astype(str).values
    return out


register_source("preferences", preferences, PreferenceOptions)
