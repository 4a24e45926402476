"""Config-time checks of the attacks: settings under which an attack cannot act, refused
with the numbers before any data or model loads (called from
``aggregators/robust_checks.py``, itself called from ``components.combination_problems``).

- an omniscient step (``alie``, ``ipm``) whose ``role`` is no role of ``federation.roles``
  (it would find no attacker in any round and replace nothing);
- with every client in every round (no sampling), attackers that leave no honest update
  (``alie``, ``ipm``: nothing to craft from), or, for ``alie`` without ``z``, attackers
  that are a majority of the round (``s = floor(n / 2 + 1) - f <= 0``: z_max undefined,
  every round would go on unattacked; ``attacks/omniscient.py``);
- a class ``target`` (``backdoor``, ``label_flip``, ``backdoor_asr``) that is not a class
  of the model, when ``model.num_labels`` is given (otherwise it is inferred from the data
  and the client middleware refuses it, naming the client).
"""

from __future__ import annotations

import math

from fedfm.attacks.omniscient import OMNISCIENT

TARGETED = ("backdoor", "label_flip")


def _omniscient_problems(exp, n: int) -> list[str]:
    from fedfm.runtime.roles import role_sizes

    fed = exp.federation
    sizes = dict(zip([r.name for r in fed.roles], role_sizes(fed.roles, fed.clients)))
    problems = []
    for i, spec in enumerate(exp.server_steps):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in OMNISCIENT:
            continue
        role = spec.get("role", "attacker")
        where = f"server_steps[{i}] ({name})"
        if role not in sizes:
            known = ", ".join(sizes) or "none"
            problems.append(f"{where}: role '{role}' is not a role of federation.roles (roles: {known}); "
                            "no update would ever be replaced")
            continue
        if n != fed.clients:  # sampled rounds: how many attackers a round holds is chance
            continue
        f = sizes[role]
        if f >= n:
            problems.append(f"{where}: all {n} clients of every round have role '{role}': no honest update to "
                            "craft the attack from, so no round would be attacked; use fewer attackers")
        elif name == "alie" and spec.get("z") is None and math.floor(n / 2 + 1) - f <= 0:
            s = math.floor(n / 2 + 1) - f
            problems.append(f"{where}: {f} attackers of the {n} clients of every round are a majority "
                            f"(s = floor({n}/2 + 1) - {f} = {s} <= 0): z_max is undefined and every round would go "
                            "on unattacked; give z or fewer attackers")
    return problems


def target_problems(exp) -> list[str]:
    """Targets of backdoor, label_flip and backdoor_asr that are no class of the model (once
    ``model.num_labels`` is known: given, or inferred from the data by ``resolve_labels``)."""
    c = exp.model.num_labels
    if c is None:
        return []
    problems = []
    for r in exp.federation.roles:
        for j, m in enumerate(r.middleware):
            target = m.get("target") if isinstance(m, dict) else None
            if m.get("name") in TARGETED and isinstance(target, int) and not 0 <= target < c:
                problems.append(f"role '{r.name}' middleware[{j}] ({m['name']}): target {target} is not a class of "
                                f"the model (model.num_labels {c}: classes 0..{c - 1})")
    for i, spec in enumerate(exp.server_steps):
        target = spec.get("target", 1) if isinstance(spec, dict) else None
        if isinstance(spec, dict) and spec.get("name") == "backdoor_asr" and isinstance(target, int) and not 0 <= target < c:
            problems.append(f"server_steps[{i}] (backdoor_asr): target {target} is not a class of the model "
                            f"(model.num_labels {c}: classes 0..{c - 1})")
    return problems


def attack_problems(exp, n: int) -> list[str]:
    """Reasons the attacks of ``exp`` cannot act, for ``n`` clients per round."""
    return _omniscient_problems(exp, n) + target_problems(exp)


def model_classes(ctx) -> int | None:
    """The number of classes of the client's model (its config's ``num_labels``), or None."""
    n = getattr(getattr(getattr(ctx, "model", None), "config", None), "num_labels", None)
    return int(n) if n else None


def check_target(target: int | None, num_labels: int, attack: str, cid: int) -> None:
    """Raise, naming the client, when ``target`` is not a class of the model."""
    if target is not None and not 0 <= target < num_labels:
        raise ValueError(f"client {cid}: {attack}.target {target} is not a class of the model "
                         f"(num_labels {num_labels}: classes 0..{num_labels - 1})")
