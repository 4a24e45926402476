"""Plugins: a user's own components, loaded before the config's components are checked.

``plugins: [my_rule.py, mypackage.fedfm_parts]`` in a config imports each entry once per
process: a path ending in ``.py`` (relative to the config file's folder, else to the
working directory) or a dotted module name. A plugin registers its components with the
ordinary ``register_*`` calls at import, so its names are valid in the same config (see
docs/extending.md). On Flower every node imports the same entries, so a file plugin must
exist at that path on every machine (or be an installed module).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path


class PluginError(ValueError):
    """A plugin that cannot be found or imported."""


def plugin_path(entry: str, base: Path | None) -> Path:
    candidates = [Path(entry).expanduser()]
    if base is not None and not Path(entry).is_absolute():
        candidates.insert(0, base / entry)
    for p in candidates:
        if p.is_file():
            return p.resolve()
    looked = ", ".join(str(p) for p in candidates)
    raise PluginError(f"plugins: file '{entry}' not found (looked at {looked})")


def load_plugins(entries: list[str], base: Path | None = None) -> None:
    for entry in entries:
        if entry.endswith(".py"):
            path = plugin_path(entry, base)
            name = f"fedfm_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise PluginError(f"plugins: importing {path} failed: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                importlib.import_module(entry)
            except ImportError as exc:
                raise PluginError(f"plugins: cannot import module '{entry}': {exc}") from None
