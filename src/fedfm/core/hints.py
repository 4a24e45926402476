"""The hint after a validation error: which key was meant, when a key is not allowed.

Pydantic says ``Extra inputs are not permitted`` for a misspelt key (``train.lrr``) and
stops there; this adds the closest allowed key of that section (``did you mean 'lr'?``),
or the allowed keys when none is close, and, for a client's profile key
(``learner: {name: fedra, layers: 2}``), where it goes. Written by hand: pydantic has no
suggestions, and it is ``difflib`` over the model's field names.
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence, get_args

from pydantic import BaseModel

from fedfm.core.profile_keys import profile_keys


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def model_at(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``loc`` (list indices skipped), or None when
    the path leaves the models (a dict of free keys, a union of several models)."""
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            continue
        field = model.model_fields.get(str(part))
        found = _models_in(field.annotation) if field is not None else []
        if len(found) != 1:
            return None
        model = found[0]
    return model


def key_hint(model: type[BaseModel] | None, err: dict[str, Any]) -> str:
    """``; did you mean 'lr'?`` (or ``; allowed: a, b, c``) for a key ``model`` does not allow
    at ``err['loc']``; empty for any other error."""
    if model is None or err.get("type") != "extra_forbidden" or not err.get("loc"):
        return ""
    section = model_at(model, err["loc"][:-1])
    if section is None:
        return ""
    allowed = sorted(section.model_fields)
    key = str(err["loc"][-1])
    # learner: {name: fedra, layers: 2}: a client's size, which each role's profile gives
    profile = f"; '{key}' is a client's profile key: federation.roles[].profile.{key}" if key in profile_keys() else ""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?{profile}"
    return (f"; allowed: {', '.join(allowed)}" if allowed else "") + profile
