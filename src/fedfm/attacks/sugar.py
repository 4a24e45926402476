"""The ``attack:`` config section: one line for the usual attack setup, expanded during
validation into the one mechanism that runs it (client roles and server steps).

    attack: {name: alie, fraction: 0.2}                 # or count: 2, or cids: [0, 3]
    attack: {name: backdoor, trigger: cf, target: 1}    # fraction 0.2 by default

becomes a role ``{name: attacker, fraction: 0.2, middleware: [{name: backdoor, ...}]}``
appended to ``federation.roles``; for the omniscient attacks (``alie``, ``ipm``,
``attacks/omniscient.py``) the role has no middleware and the attack's server step
``{name: alie, role: attacker, ...}`` is put *first* in ``server_steps``, so it runs before
any defense step. ``attack: {name: compromised_base, checkpoint: DIR, ...}`` adds no role:
the model comes from the planted checkpoint and the ``backdoor_asr`` step measures it
(``attacks/compromised_base.py``). The expanded form is what the run records (config.yaml): the section
itself is consumed. Any other key is the attack's own parameter, validated by its schema.
"""

from __future__ import annotations

import copy
from typing import Any

ROLE = "attacker"
SIZE_KEYS = ("fraction", "count", "cids")


def expand_attack(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its ``attack`` section replaced by a role (and a server step)."""
    from fedfm.attacks.omniscient import OMNISCIENT
    from fedfm.learners.middleware import middlewares

    out = copy.deepcopy(raw)
    spec = out.pop("attack")
    if spec is None:
        return out
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError("attack: a mapping with a 'name', e.g. {name: sign_flip, fraction: 0.2}")
    spec = dict(spec)
    name = spec.pop("name")
    role_name = spec.pop("role", ROLE)
    size = {k: spec.pop(k) for k in SIZE_KEYS if k in spec}
    if len(size) > 1:
        raise ValueError(f"attack: give at most one of fraction, count, cids (got {sorted(size)})")
    if name == "compromised_base":  # a planted base model, honest clients (attacks/compromised_base.py)
        if size or role_name != ROLE:
            raise ValueError("attack: compromised_base has no attacker clients (the base model is compromised); drop fraction, count, cids and role")
        from fedfm.attacks.compromised_base import expand

        return expand(out, spec)
    size = size or {"fraction": 0.2}
    if name not in OMNISCIENT and name not in middlewares.names() and name != "compromised_base":
        known = sorted(set(middlewares.names()) | set(OMNISCIENT) | {"compromised_base"})
        raise ValueError(f"attack.name: unknown attack '{name}'; known: {', '.join(known)}")
    fed = out.setdefault("federation", {})
    roles = list(fed.get("roles") or [])
    if any(isinstance(r, dict) and r.get("name") == role_name for r in roles):
        raise ValueError(f"attack: federation.roles already has a role '{role_name}'; give attack.role another name")
    role: dict[str, Any] = {"name": role_name, **size}
    if name in OMNISCIENT:
        out["server_steps"] = [{"name": name, "role": role_name, **spec}, *(out.get("server_steps") or [])]
    else:
        role["middleware"] = [{"name": name, **spec}]
    fed["roles"] = [*roles, role]
    return out
