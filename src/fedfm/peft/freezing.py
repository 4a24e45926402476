"""Freezing helpers shared by the hand-written tuners (BitFit, salience, adapters).

``peft`` freezes the base model itself; the tuners peft lacks start from
``freeze_all`` and then switch on exactly what they train, plus the task head, which
stays trainable and shared for every method (see ``base.head_modules``).
"""

from __future__ import annotations

import torch

from fedfm.peft.base import head_modules


def freeze_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def train_heads(model: torch.nn.Module) -> list[str]:
    """Make every task head (``classifier``, ``score``) trainable; returns their names."""
    heads = head_modules(model)
    for name, module in model.named_modules():
        if name.split(".")[-1] in heads:
            for p in module.parameters():
                p.requires_grad_(True)
    return heads


def matches(name: str, key: str) -> bool:
    """peft's rule: ``key`` names a module if it equals its name or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def is_head(name: str, heads: list[str]) -> bool:
    return any(part in heads for part in name.split("."))


def find_modules(
    model: torch.nn.Module, targets: list[str], kind: type = torch.nn.Linear, key: str = "peft.target_modules"
) -> list[tuple[str, torch.nn.Module]]:
    """Modules of type ``kind`` named by ``targets`` (suffix match), task heads excluded.

    Raises a ValueError naming ``key`` when a target matches nothing.
    """
    heads = head_modules(model)
    found: list[tuple[str, torch.nn.Module]] = []
    unmatched = set(targets)
    for name, module in model.named_modules():
        if not isinstance(module, kind) or is_head(name, heads):
            continue
        hit = [t for t in targets if matches(name, t)]
        if hit:
            found.append((name, module))
            unmatched -= set(hit)
    if unmatched:
        raise ValueError(f"{key}: {sorted(unmatched)} match no {kind.__name__} module of the model")
    return found


def set_submodule(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
