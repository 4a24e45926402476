"""A rule over the holders of one group of names: the combination server halves use when
each client trains part of the model (FedRA's layers, Hetero-FLASH's density levels,
DiPrompt's domain prompts), so each group is combined over the clients that trained it.

The round loop holds the rule's minimum for the whole round (``runtime/loop.py``), but a
group's holders are a subset: a layer two clients trained cannot be combined by Krum with
f = 1 (it needs f + 3 = 4). Such a group gets a zero delta this round, as one nobody
trained does, rather than being averaged behind the robust rule's back (so it stays where
it is under a plain ``sgd`` server optimizer; ``fedavgm``, ``fedadam`` and ``fedyogi``
still move it by their moments of earlier rounds); the reason is
noted under ``held_back`` in the round's row of metrics.jsonl (``note_held_back``, read
by ``runtime/algorithm.FedAlgorithm.aggregate``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fedfm.aggregators.base import TooFewUpdates
from fedfm.core.types import State

HELD_BACK = "held_back"  # RoundContext.notes key: {group: reason}


def combine_holders(rule, rule_params, model: State, deltas: Sequence[State], weights: Sequence[float],
                    group: str, notes: dict[str, Any] | None) -> State:
    """The rule's delta over the holders' ``deltas`` on the names of ``model`` (a sub-State);
    a zero delta when there are no holders, or fewer than the rule combines (noted)."""
    if deltas:
        try:
            return rule(model, list(deltas), list(weights), rule_params)
        except TooFewUpdates as exc:
            if notes is not None:
                notes.setdefault(HELD_BACK, {})[group] = f"{len(deltas)} holder(s), the rule combines at least {exc.fewest}"
    return {n: torch.zeros_like(t) for n, t in model.items()}


__all__ = ["HELD_BACK", "combine_holders"]
