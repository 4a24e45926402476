"""Dotted ``-o key.sub=value`` overrides of a raw config, and the error text that marks
which override caused which error (``config.from_dict`` uses both)."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedfm.core.hints import key_hint


class ConfigError(ValueError):
    """A config that cannot run; the message names the key (and the file)."""


def format_errors(exc: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One line per error, naming its key; with ``model`` (the model validated), a key it
    does not allow gets the closest allowed one (``core/hints.py``)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        lines.append(f"  {loc or '(top level)'}: {err['msg']}{key_hint(model, err)}")
    return lines


def _override_key(text: str) -> str:
    """The dotted key of an override, list indices included (``server_steps.0.max_steps``)."""
    return ".".join(p for p in text.split("=", 1)[0].strip().split(".") if p)


def _dotted(loc: str) -> str:
    """An error location with its list indices as dotted parts: ``server_steps[0].lr`` -> ``server_steps.0.lr``."""
    return re.sub(r"\[(\d+)\]", r".\1", loc)


def blame(lines: list[str], overrides: list[str], source: str) -> str:
    """The error text, each line that a ``-o`` override caused marked with that override.

    When every line comes from an override, the header names the overrides, not the file:
    the file is fine, the command line is not.
    """
    marked, blamed, used = [], 0, []
    for line in lines:
        key = _dotted(line.strip().split(":", 1)[0].strip())
        hits = [
            o for o in overrides
            if key and (key == _override_key(o) or key.startswith(_override_key(o) + ".")
                        or _override_key(o).startswith(key + "."))
        ]
        if hits:
            blamed += 1
            used += [o for o in hits if o not in used]
            line += " (from " + ", ".join(f"-o {o}" for o in hits) + ")"
        marked.append(line)
    if lines and blamed == len(lines):
        header = "invalid override " + ", ".join(f"-o {o}" for o in used) + f" (config {source})"
    else:
        header = f"invalid config {source}"
    return header + ":\n" + "\n".join(marked)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-3`` -> (["train", "lr"], 0.001); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': the value is not valid YAML: {exc}") from None
    return parts, value


# A model source given on the command line replaces the other one from the file.
_EXCLUSIVE = {("model", "path"): ("model", "package"), ("model", "package"): ("model", "path")}


def _index(items: list, part: str, text: str, where: str) -> int:
    """``part`` as an index into the list at ``where`` (``server_steps.0.max_steps=20``)."""
    if not part.isdigit() or int(part) >= len(items):
        last = f" to {where}.{len(items) - 1}" if len(items) > 1 else ""
        raise ConfigError(f"override '{text}': {where} is a list of {len(items)} item(s); name one by its index: "
                          f"{where}.0{last}" if items else f"override '{text}': {where} is an empty list")
    return int(part)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    keys = [tuple(parse_override(t)[0]) for t in overrides]
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                nxt = node[_index(node, p, text, ".".join(parts[:i]))]
            else:
                nxt = node.get(p)
                if nxt is None:
                    nxt = node[p] = {}
            if not isinstance(nxt, (dict, list)):
                raise ConfigError(f"override '{text}': {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        if isinstance(node, list):
            node[_index(node, parts[-1], text, ".".join(parts[:-1]))] = value
        else:
            node[parts[-1]] = value
        other = _EXCLUSIVE.get(tuple(parts))
        if other is not None and value is not None and other not in keys:
            node[other[-1]] = None  # -o model.path=DIR: the file's model.package no longer applies
    return out
