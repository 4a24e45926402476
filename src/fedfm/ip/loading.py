"""A suspect model from disk: a run directory, or a final.safetensors beside its config.yaml.

The base model is rebuilt from the run's config exactly as ``runtime/workbench.py`` builds
it (the task's model, then the tuner under the seed ``derive_seed(seed, 0xADA)``), without
loading any federation data; the file's tensors replace the trainable State, and names it
lacks (``peft.local`` ones) keep the template's values.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedfm.codecs.serialize import read_state_file
from fedfm.config import load_config
from fedfm.core.seeding import derive_seed
from fedfm.core.types import State
from fedfm.ip.unique import Base
from fedfm.peft import apply_tuner, get_state
from fedfm.tasks import build_task

TUNER_TAG = 0xADA  # the seed tag runtime/workbench.py applies the tuner under
FINAL = "final.safetensors"


def resolve(model: str | Path, config: str | Path | None = None) -> tuple[Path, Path]:
    """(config.yaml, weights file) of a run directory or a .safetensors file."""
    path = Path(model)
    if path.is_dir():
        weights = path / FINAL
    elif path.is_file() and path.suffix == ".safetensors":
        weights = path
    else:
        raise FileNotFoundError(f"MODEL {path}: not a run directory nor a .safetensors file")
    if not weights.is_file():
        rounds = sorted((path / "checkpoints").glob("round-*/state.safetensors")) if path.is_dir() else []
        hint = (f" (an unfinished run: its last checkpoint's global model is {rounds[-1]}; give that file, "
                f"with --config {path / 'config.yaml'})") if rounds else ""
        raise FileNotFoundError(f"MODEL {path}: no {FINAL} in this directory{hint}")
    cfg = Path(config) if config is not None else weights.parent / "config.yaml"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.yaml beside {weights}; pass --config")
    return cfg, weights


def build_base(exp) -> tuple[Base, State]:
    """(the base model with the tuner applied, its initial trainable State)."""
    task = build_task(exp.model.task)
    model, tokenizer = task.build(exp.model, exp.seed)
    torch.manual_seed(derive_seed(exp.seed, TUNER_TAG))
    model = apply_tuner(model, exp.peft, exp.model.task)
    model.eval()
    return Base(model, task, exp.model.task, tokenizer), get_state(model)


def complete(template: State, tensors: State, source: str) -> State:
    """``tensors`` over the template; a name or shape the model lacks is an error."""
    unknown = sorted(set(tensors) - set(template))
    if unknown:
        raise KeyError(f"{source}: tensors {unknown[:3]} are not trainable parameters of the configured model")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(template[k].shape):
            raise ValueError(f"{source}: '{k}' has shape {tuple(t.shape)}, the model expects {tuple(template[k].shape)}")
    return {**template, **{k: t.to(template[k].dtype) for k, t in tensors.items()}}


def load_suspect(model: str | Path, config: str | Path | None = None):
    """(experiment, Base, full trainable State of the suspect model)."""
    cfg, weights = resolve(model, config)
    # the run's own config.yaml as recorded (a check added since must not lock a run out); a --config given is checked
    exp = load_config(cfg, components=config is not None)
    tensors = read_state_file(weights, "MODEL")  # before the model is built: a damaged file fails at once
    base, template = build_base(exp)
    return exp, base, complete(template, tensors, str(weights))


def trigger_spec(exp, size: int | None = None, length: int | None = None, continuation: int | None = None,
                 steps: tuple[str, ...] = ("waffle",)):
    """The trigger spec of the run's first configured step among ``steps`` (``waffle``, or
    ``client_watermark`` when tracing): its parameters (trigger kind and pattern shape
    included), else the defaults, each given value replacing the configured one."""
    from dataclasses import replace

    from fedfm.ip.waffle import WaffleParams

    configured = next((s for name in steps for s in exp.server_steps if s.get("name") == name), None)
    fields = ("trigger_size", "trigger_length", "continuation", "trigger", "patterns", "pattern_tokens", "fillers_per_pattern")
    defaults = WaffleParams(key="-", **{k: v for k, v in (configured or {}).items() if k in fields})
    spec = defaults.spec(exp.model.task, exp.model.num_labels)
    given = {"size": size, "length": length, "continuation": continuation}
    return replace(spec, **{k: v for k, v in given.items() if v is not None})
