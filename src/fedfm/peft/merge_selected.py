"""Load a finished run's selected-entry State (``salience``, ``sparse``) into the base
weights: ``model.init_from`` from such a run (a stage chained after it).

Those tuners train a tensor of the selected entries of each targeted weight
(``<layer>.parametrizations.weight.0.values``), and no index is stored: the selection is
recomputed here from the finished run's ``config.yaml`` (its ``peft`` section) exactly as
that run computed it: from the weights it started from for ``salience`` (which the model
holds here: ``load_init`` loads the runs it started from first), from the mask seed for
``sparse``. Then ``W[index] = values`` in each layer, before the next
run's tuner is applied. Written by hand: it inverts fedfm's own parametrization.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedfm.core.types import State

SELECTED = ".parametrizations.weight.0.values"


def selected_keys(state: State) -> list[str]:
    return sorted(k for k in state if k.endswith(SELECTED))


def _source_peft(source: Path) -> dict:
    """The peft section of the config.yaml beside ``source``'s State."""
    import yaml

    run_dir = source.parent
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        raise ValueError(
            f"model.init_from: {source} holds selected-entry tensors (peft.method salience or sparse) and there is "
            f"no config.yaml beside it ({cfg}) to recompute which entries they are: give the finished run's folder"
        )
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    return dict(raw.get("peft") or {})


def merge_selected(model: torch.nn.Module, state: State, source: Path) -> list[str]:
    """Write the selected entries of ``state`` into ``model``'s weights (in place); returns
    the keys used. ``source`` is the State file (its folder holds the run's config)."""
    keys = selected_keys(state)
    if not keys:
        return []
    from fedfm.peft import salience, sparse
    from fedfm.peft.base import tuners

    peft = _source_peft(source)
    method = peft.pop("method", None)
    peft.pop("local", None)
    if method not in ("salience", "sparse"):
        raise ValueError(f"model.init_from: {source} holds selected-entry tensors, but its run's peft.method is {method!r}")
    params = tuners.parse(method, peft, f"peft (of {source.parent / 'config.yaml'})")
    chosen = salience.selections(model, params) if method == "salience" else sparse.selections(model, params)
    rows = method == "salience" and params.granularity == "row"
    expected = {name + SELECTED: (module, index) for name, module, index in chosen}
    unknown = sorted(set(keys) - set(expected))
    if unknown:
        raise ValueError(f"model.init_from: '{unknown[0]}' of {source} names no layer its peft section targets in this model")
    with torch.no_grad():
        for key in keys:
            module, index = expected[key]
            values = state[key]
            want = (index.numel(), module.weight.shape[1]) if rows else (index.numel(),)
            if tuple(values.shape) != want:
                raise ValueError(f"model.init_from: '{key}' has shape {tuple(values.shape)} in {source}, the selection needs {want}")
            target = module.weight if rows else module.weight.view(-1)
            target[index] = values.to(module.weight.dtype)
    return keys
