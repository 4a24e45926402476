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

A room may also say which settings read its key (``read_by``: ``"learner.name=fedra"``,
``"learner.name=fedapt"``, ``"server_steps=sim_clock"``). ``unread_profile_keys`` then names
a role's key that no setting of this run reads and no config field of it names (``rank``
with learner ``fedra``; not ``domain`` under ``ifca``'s ``profile_key: domain``): ``fedfm
check`` and ``fedfm run`` warn, since the run goes on as if the key were absent. A key
registered without ``read_by`` (``memory_mb``, a plugin's) is never named.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from pydantic import BaseModel, Field

RESERVED = "role"
MARK = "names_profile_key"  # json_schema_extra flag of a parameter whose value is a profile key
_keys: dict[str, list[str]] = {}
_readers: dict[str, list[str]] = {}  # key -> "<config path>=<value>" settings that read it


def register_profile_key(name: str, help: str, read_by: Iterable[str] = ()) -> str:
    """Declare that a room reads ``profile[name]``; ``help`` says what it means, ``read_by``
    the settings under which it is read (``"learner.name=hetlora"``; see the module
    docstring)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"register_profile_key: name must be a non-empty string, got {name!r}")
    if name == RESERVED:
        raise ValueError(f"register_profile_key: '{RESERVED}' is set by the runtime to the role's name")
    read_by = [str(e) for e in read_by]
    for entry in read_by:
        path, sep, value = entry.partition("=")
        if not sep or not path or not value:
            raise ValueError(f"register_profile_key {name!r}: read_by entries are '<config path>=<value>', got {entry!r}")
    helps = _keys.setdefault(name, [])
    if help not in helps:
        helps.append(help)
    for entry in read_by:
        readers = _readers.setdefault(name, [])
        if entry not in readers:
            readers.append(entry)
    return name


def _setting(exp, path: str) -> list[str]:
    """The value(s) of a config path: ``server_steps`` gives the steps' names."""
    if path == "server_steps":
        return [str(s.get("name")) for s in exp.server_steps]
    node = exp
    for part in path.split("."):
        node = getattr(node, part, None)  # a path the config lacks: nothing reads the key
    return [] if node is None else [str(node)]


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


def _readers_said(readers: list[str]) -> str:
    """``["learner.name=split", "learner.name=splitfed"]`` -> ``learner.name split or splitfed``."""
    by_path: dict[str, list[str]] = {}
    for entry in readers:
        path, _, value = entry.partition("=")
        by_path.setdefault(path, []).append(value)
    return " or ".join(f"{path} {' or '.join(values)}" for path, values in by_path.items())


def unread_profile_keys(exp, named: Iterable[str] = ()) -> list[str]:
    """One line per profile key that roles set and no setting of ``exp`` reads (its
    ``read_by``): the run goes on as if the key were absent. ``named``: the keys a config
    field of ``exp`` names (``named_profile_keys``), read there whatever their ``read_by``
    (``ifca``'s ``profile_key: domain``)."""
    named = set(named)
    roles_of: dict[str, list[str]] = {}
    for role in exp.federation.roles:
        for key in role.profile:
            readers = _readers.get(key)
            if readers and key not in named and not any(value in _setting(exp, path) for path, _, value in (r.partition("=") for r in readers)):
                roles_of.setdefault(key, []).append(role.name)
    return [f"federation.roles {', '.join(repr(r) for r in roles)}: profile.{key} is read only with "
            f"{_readers_said(_readers[key])}; this run ignores it" for key, roles in roles_of.items()]


__all__ = ["named_profile_keys", "profile_key_field", "profile_key_problems", "profile_keys", "register_profile_key",
           "unread_profile_keys"]
