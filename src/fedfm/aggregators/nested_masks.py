"""Hetero-FLASH's per-client densities (Babakniya et al. 2023, "Revisiting Sparsity
Hunting in Federated Learning: Why does Sparsity Consensus Matter?", TMLR, section on
heterogeneous clients): nested sub-masks of the server's mask and the combination of the
updates entry by entry over the clients that hold it.

A client's share ``f`` of the server's mask comes from its profile (``federation.roles[].
profile``, ``runtime/capacity.py``): ``density`` (the client's own share of prunable
entries, in ``(0, learner.density]``; ``f = density / learner.density``) or ``capacity``
(``f`` itself, in ``(0, 1]``); neither gives ``f = 1``, the server's mask.

``level_masks``: a client at ``f < 1`` trains, in each weight, the ``ceil(f * k)`` entries
of the server's mask (``k`` kept there) of largest ``|w|`` in the current model, as
FLASH's server picks each density level's mask from the global weights every round; at
``f = 1`` the server's mask itself. A smaller ``f`` gives a subset of a larger one's
entries (the same ranking, cut shorter), so the levels are nested.

``nested_combine``: an entry is averaged over the clients that trained it only (FLASH's
masked average: the weights summed over the clients, divided by how many hold the entry).
With the levels ``f_1 < ... < f_L`` of a round's clients, the entries first held at level
``j`` (in ``f_j``'s mask, not in ``f_{j-1}``'s) take the rule's combination of the deltas
of the clients at ``f >= f_j``, each restricted to ``f_j``'s mask (every one of them holds
all of it: a coordinate-wise rule gives the holder-wise average exactly, and a
distance-based one such as Krum compares the clients on what they all trained). Tensors
outside the masks (task heads, biases, norms) take the combination over all clients. An
entry of the server's mask no client of the round holds does not move; nor do the entries
of a level held by fewer clients than the rule combines (Krum with f = 1 needs 4: a robust
rule is not replaced by a plain mean behind its back; noted under ``held_back`` in the
round's row, ``aggregators/holders.py``). The first level holds every client of the
round, which the round loop keeps at the rule's minimum.

``holder_average``: in a JMWST round the clients prune and regrow their masks, so the
holders of an entry no longer follow the levels: the entry's new value is the
example-weighted mean of the trained values of the clients whose final mask keeps it
(FLASH's masked average; zero where none does), computed here directly, so the rule must
be ``fedavg`` (checked at config time). Written by hand: no library combines nested or
per-client sparse updates.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from fedfm.aggregators.holders import combine_holders
from fedfm.core.profile_keys import register_profile_key
from fedfm.core.types import State, Update

register_profile_key("density", "flash: the client's own share of prunable entries, at most learner.density",
                     ("learner.name=flash",))


def client_share(profile: dict, target: float, who: str) -> float:
    """``f`` in (0, 1] for a client with ``profile`` under the learner's ``density``."""
    if "density" in profile and "capacity" in profile:
        raise ValueError(f"{who}: profile gives both density and capacity: give one (density is the client's share "
                         "of prunable entries, capacity its share of the server's mask)")
    if "density" in profile:
        d = profile["density"]
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 < d <= target:
            raise ValueError(f"{who}: profile.density must be a number in (0, learner.density = {target}], got {d!r}")
        return float(d) / target
    if "capacity" in profile:
        c = profile["capacity"]
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not 0 < c <= 1:
            raise ValueError(f"{who}: profile.capacity must be a number in (0, 1], got {c!r}")
        return float(c)
    return 1.0


def level_masks(model: State, masks: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """Per weight, the ``ceil(share * kept)`` entries of ``masks`` of largest ``|w|`` in
    ``model`` (ties to the lower index); ``masks`` itself at ``share >= 1``."""
    if share >= 1.0:
        return masks
    out = {}
    for n, m in masks.items():
        kept = int(m.sum())
        k = math.ceil(share * kept) if kept else 0
        score = model[n].detach().float().abs().masked_fill(~m, -1.0).reshape(-1)  # (numel,): outside the mask last
        keep = torch.zeros(m.numel(), dtype=torch.bool)
        keep[torch.sort(score, descending=True, stable=True).indices[:k]] = True
        out[n] = keep.view(m.shape)
    return out


Rule = Callable[..., State]


def nested_combine(model: State, updates: Sequence[Update], shares: Sequence[float],
                   level_of: Callable[[float], dict[str, torch.Tensor]], rule: Rule, rule_params,
                   notes: dict | None = None) -> State:
    """The rule's delta on ``model``, each masked entry combined over the clients holding it;
    ``shares[i]`` is ``updates[i]``'s ``f``, ``level_of(f)`` its masks (nested in ``f``).
    A level above the first held by fewer clients than the rule combines leaves its new
    entries where they are (``aggregators/holders.py``, noted as ``level <f>``)."""
    levels = sorted(set(shares))
    weights = [float(u.num_examples) for u in updates]
    delta: State = {}
    below: dict[str, torch.Tensor] | None = None  # the previous level's masks
    for f in levels:
        masks = level_of(f)
        who = [i for i, s in enumerate(shares) if s >= f]
        deltas = [{k: (u.payload[k] * masks[k] if k in masks else u.payload[k]) for k in model}
                  for u in (updates[i] for i in who)]
        combined = combine_holders(rule, rule_params, model, deltas, [weights[i] for i in who], f"level {f:g}", notes)
        for k in model:
            if k not in masks:
                if below is None:  # held by every client: the first level has them all
                    delta[k] = combined[k]
                continue
            new = masks[k] if below is None else masks[k] & ~below[k]
            start = delta.get(k, torch.zeros_like(model[k]))
            delta[k] = torch.where(new, combined[k].to(start.dtype), start)
        below = masks
    return delta


def holder_average(model: State, updates: Sequence[Update], received: Sequence[dict[str, torch.Tensor]],
                   held: Sequence[dict[str, torch.Tensor]]) -> State:
    """FLASH's masked average when each client's mask changed during the round (JMWST):
    per masked weight, the example-weighted mean of the clients' trained entries over the
    clients whose final mask ``held[i]`` keeps them, as a delta on ``model`` (an entry none
    keeps goes to zero). Client i trained ``model`` masked by ``received[i]`` and sent the
    delta of its trained weights against that."""
    delta: State = {}
    for n in held[0]:
        num = torch.zeros_like(model[n], dtype=torch.float64)
        den = torch.zeros_like(model[n], dtype=torch.float64)
        for u, got, keep in zip(updates, received, held):
            trained = model[n].double() * got[n] + u.payload[n].double()  # (shape of w)
            num += float(u.num_examples) * keep[n] * trained
            den += float(u.num_examples) * keep[n]
        mean = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
        delta[n] = (mean - model[n].double()).to(model[n].dtype)
    return delta


__all__ = ["client_share", "holder_average", "level_masks", "nested_combine"]
