"""Client-profile keys: what a role's ``profile`` may hold (``federation.roles[].profile``).

A profile is a free mapping that many rooms read (``runtime/capacity.py``: ``rank``,
``layers``, ``cut``, ``capacity``, ``speed``, the link and memory keys;
``aggregators/nested_masks.py``: ``density``; ``personalize/fedapt.py``: ``domain``).
Each room registers the keys it reads where it reads them, with
``register_profile_key(name, help)``, as components register themselves; a plugin that
reads a key of its own registers it the same way (docs/extending.md). Several rooms may
register one key (each help is kept).

A component parameter whose value is a profile key (``ifca``'s ``profile_key``,
``cluster_report``'s ``truth_profile``) is declared with ``profile_key_field``: the key it
names is known to the config that names it, so a user's own metadata key
(``truth_profile: language``) passes there and nowhere else.

``profile_key_problems`` runs with the config's cross-field checks
(``components.validate_components``), before any data or model loads: a role's key that is
neither registered nor named by the config is refused, naming the role, the key, its
close matches and the known keys. ``role`` is set by the runtime to the role's name
(``runtime/roles.py``) and is refused in a profile.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from pydantic import BaseModel, Field

RESERVED = "role"
MARK = "names_profile_key"  # json_schema_extra flag of a parameter whose value is a profile key
_keys: dict[str, list[str]] = {}


def register_profile_key(name: str, help: str) -> str:
    """Declare that a room reads ``profile[name]``; ``help`` says what it means."""
    if not name or not isinstance(name, str):
        raise ValueError(f"register_profile_key: name must be a non-empty string, got {name!r}")
    if name == RESERVED:
        raise ValueError(f"register_profile_key: '{RESERVED}' is set by the runtime to the role's name")
    helps = _keys.setdefault(name, [])
    if help not in helps:
        helps.append(help)
    return name


def profile_keys() -> dict[str, str]:
    """Every registered key -> its help (several rooms' helps joined by '; ')."""
    return {k: "; ".join(_keys[k]) for k in sorted(_keys)}


def profile_key_field(default: Any, description: str) -> Any:
    """A pydantic ``Field`` for a component parameter whose value names a profile key."""
    return Field(default, description=description, json_schema_extra={MARK: True})


def named_profile_keys(parsed: Iterable[tuple[str, BaseModel]]) -> dict[str, str]:
    """profile key -> the config field naming it, over validated component parameters
    (``where`` -> params, e.g. ``("learner", IFCAParams(...))``)."""
    out: dict[str, str] = {}
    for where, params in parsed:
        for field_name, info in type(params).model_fields.items():
            extra = info.json_schema_extra
            if not (isinstance(extra, dict) and extra.get(MARK)):
                continue
            value = getattr(params, field_name)
            for key in [value] if isinstance(value, str) else list(value or []):
                out.setdefault(str(key), f"{where}.{field_name}")
    return out


def profile_key_problems(roles, named: dict[str, str]) -> list[str]:
    """One reason per role key that no room registered and no config field names."""
    known = sorted(set(_keys) | set(named))
    problems = []
    for role in roles:
        for key in role.profile:
            who = f"federation.roles '{role.name}'"
            if key == RESERVED:
                problems.append(f"{who}: profile.{RESERVED} is set to the role's name by the runtime; remove it from the profile")
                continue
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
            problems.append(
                f"{who}: unknown profile key '{key}'{hint} Known profile keys: {', '.join(known)}. "
                "A key of your own is accepted when a config field names it (e.g. cluster_report's truth_profile) "
                "or a plugin registers it (fedfm.core.profile_keys.register_profile_key)")
    return problems


__all__ = ["named_profile_keys", "profile_key_field", "profile_key_problems", "profile_keys", "register_profile_key"]
