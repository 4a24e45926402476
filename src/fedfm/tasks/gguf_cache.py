"""GGUF -> a cached safetensors directory, converted once and reused by every later run.

A GGUF checkpoint (the llama.cpp format: ``transformers`` reads it through the ``gguf``
package and dequantizes every tensor) takes ~25 s to load on a laptop CPU. fedfm converts
it once into an ordinary Hugging Face directory (config.json, model.safetensors in fp32,
tokenizer files with the chat template) under the cache folder, and every run, client and
test after that loads the directory in about a second.

The cache folder is ``$FEDFM_CACHE`` if set, else ``$XDG_CACHE_HOME/fedfm`` (by default
``~/.cache/fedfm``). An entry is keyed by the GGUF's name, size and a hash of its first
MiB, so a different file never reuses a stale conversion. Entries are written to a
temporary folder and renamed into place, so an interrupted conversion leaves nothing
half-written and two processes converting at once both end with one valid entry.

Why by hand: ``transformers`` loads GGUF files but has no on-disk cache of the
dequantized result; the conversion itself is ``transformers``' own loader
(``from_pretrained(dir, gguf_file=...)``), its weights copied into a model built from the
same config without the GGUF ``quantization_config``, then ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

DONE_MARKER = ".fedfm-complete"


def cache_root() -> Path:
    """``$FEDFM_CACHE``, else the user cache folder (``$XDG_CACHE_HOME/fedfm`` or ``~/.cache/fedfm``)."""
    env = os.environ.get("FEDFM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fedfm"


def gguf_key(gguf_path: Path) -> str:
    """``<stem>-<size>-<sha256 of the first MiB, 12 hex>``: stable, cheap, and file-specific."""
    h = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        h.update(f.read(1 << 20))
    return f"{gguf_path.stem}-{gguf_path.stat().st_size}-{h.hexdigest()[:12]}"


def cached_dir(gguf_path: str | Path, root: Path | None = None) -> Path:
    """Where the conversion of ``gguf_path`` lives (whether or not it exists yet)."""
    gguf_path = Path(gguf_path)
    return (root or cache_root()) / "gguf" / gguf_key(gguf_path)


def is_complete(directory: Path) -> bool:
    return (directory / DONE_MARKER).is_file() and (directory / "config.json").is_file()


def load_gguf(gguf_path: Path):
    """(model, tokenizer) through ``transformers``' GGUF loader, weights dequantized to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedfm.tasks.loading import quiet_transformers

    _require_gguf()
    quiet_transformers()
    directory, name = str(gguf_path.parent), gguf_path.name
    kwargs = {}
    try:  # transformers >= 5.2 can keep GGUF blocks packed; ask for plain dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A model of the same class and config, without GGUF quantization settings, holding
    exactly the same (already dequantized) weights."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config).to(torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or {})
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    fresh.tie_weights()
    return fresh.eval()


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError:
        raise ImportError("reading a GGUF model needs the 'gguf' package: pip install 'fedfm[llm]'") from None


def convert(gguf_path: Path, target: Path, progress: bool = True) -> Path:
    """Convert ``gguf_path`` into ``target`` atomically (temp folder, then rename)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    steps = ["reading and dequantizing GGUF", "rebuilding fp32 model", "writing safetensors", "done"]
    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), disable=not progress, transient=True
        ) as bar:
            task = bar.add_task(f"{gguf_path.name}: {steps[0]}", total=len(steps) - 1)
            model, tokenizer = load_gguf(gguf_path)
            bar.update(task, advance=1, description=f"{gguf_path.name}: {steps[1]}")
            model = plain_copy(model)
            bar.update(task, advance=1, description=f"{gguf_path.name}: {steps[2]}")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / DONE_MARKER).write_text(str(gguf_path) + "\n")
            bar.update(task, advance=1, description=f"{gguf_path.name}: {steps[3]}")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every run
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):  # not a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_converted(gguf_path: str | Path, root: Path | None = None, progress: bool = True) -> Path:
    """The cached fp32 directory of ``gguf_path``; converts it on first use only."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    target = cached_dir(gguf_path, root)
    if is_complete(target):
        return target
    if target.exists():  # a stale, unmarked folder (e.g. from an older layout)
        shutil.rmtree(target, ignore_errors=True)
    return convert(gguf_path, target, progress)


def gguf_in(directory: Path) -> Path | None:
    """The single ``*.gguf`` file in ``directory``, if any."""
    files = sorted(directory.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{directory} holds several GGUF files ({', '.join(f.name for f in files)}); point model.path at one")
    return files[0] if files else None
