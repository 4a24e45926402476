"""Start a run from a previous run's final State: domain-adaptive pre-training (DAPT)
chained into federated fine-tuning (Gururangan et al. 2020, "Don't Stop Pretraining:
Adapt Language Models to Domains and Tasks"; federated: FFDAPT, Jiang et al. 2023).

``model.init_from: RUN_DIR`` (or a ``.safetensors`` file) copies the tensors of that run's
``final.safetensors`` into the freshly loaded base model, *before* this run's tuner is
applied, after those of the runs that run itself started from (its config.yaml's
``model.init_from``, followed back to the first: a stage's final State holds only what
that stage trained, so in a chain of three the first stage's tensors the second did not
train would otherwise be lost; a missing earlier run is refused with its path and the
config.yaml naming it; ``earlier_run`` says how an old relative path is looked for), wherever
a tensor's name, with the tuner prefixes of either run stripped
(``base_model.model.``, ``.base_layer``), is a parameter of the base model. A masked-LM
run (``BertForMaskedLM``: ``bert.*`` + ``cls.*``) thus initialises the encoder of a
classification run (``BertForSequenceClassification``: ``bert.*`` + ``classifier.*``);
the MLM head has no place in the classifier and is left out, the classifier starts as
usual. A ``salience`` or ``sparse`` run's selected entries are written into their weights
(``peft/merge_selected.py`` recomputes the selection from that run's config.yaml). Only the first run's *trained* tensors are in its final State: frozen layers (FFDAPT)
keep the pre-trained weights, which is what the second run loads anyway.

Refused with a clear error: a missing file, a tensor whose shape differs from the base
model's, a State none of whose tensors names a base-model parameter, tensors of blocks
past the end of one of the model's module lists (a run of a deeper model: its top layers
would be dropped without a word), and adapter tensors
(LoRA ``lora_A``/``lora_B``, bottleneck adapters) which would need merging into the
weights first (not implemented: chain a ``full`` or ``ffdapt`` stage).

A stages file (``fedfm.stages``: ``fedfm run STAGES.yaml --out DIR``) chains runs from one
YAML file, with every stage checked before the first trains, ``--resume`` and
``--overwrite``. ``run_chain`` runs raw configs one after the other in one call (stage
``i + 1`` with ``model.init_from`` set to stage ``i``'s folder, made absolute so the chain
loads from any working directory, every config validated first):
``python -m fedfm.personalize.init_from dapt.yaml finetune.yaml --out runs/chain``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch

from fedfm.codecs.serialize import read_state_file

log = logging.getLogger(__name__)

PREFIXES = ("base_model.model.",)
ADAPTER = re.compile(r"(lora_[AB]|lora_embedding_|\.adapter\.|\.shared\.|\.personal\.|ia3_l|prompt)")


def state_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    f = p / "final.safetensors" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"model.init_from: no final State at {f} (give a finished run's folder or a .safetensors file)")
    return f


def base_name(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".")


def absolute(path: str | Path) -> str:
    """``path`` made absolute and resolved (``~`` expanded). A run's ``model.init_from`` is
    recorded this way (its config.yaml, a stage's ``model.init_from``) because a chain is
    followed later from whatever working directory the next run or benchmark starts in:
    a path relative to the directory the run was started from cannot be found from another."""
    return str(Path(path).expanduser().resolve())


def recorded(dump: dict[str, Any]) -> dict[str, Any]:
    """A config mapping (``Experiment.dump()`` or a config.yaml read back) with a relative
    ``model.init_from`` made absolute against the working directory, as a run's config.yaml
    records it; other values untouched (a copy when changed)."""
    model = dump.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("init_from"), str) or Path(model["init_from"]).is_absolute():
        return dump
    return {**dump, "model": {**model, "init_from": absolute(model["init_from"])}}


def _loadable(p: Path) -> bool:
    """A finished run's folder or a .safetensors file: what a candidate for a relative path must be."""
    return (p / "final.safetensors").is_file() if p.is_dir() else (p.is_file() and p.suffix == ".safetensors")


def earlier_run(f: Path) -> Path | None:
    """The ``model.init_from`` of the run that wrote ``f`` (its config.yaml), or None.

    Runs written before init_from paths were recorded absolute may hold one relative to the
    working directory that run was started from, which is not recorded. Tried, so the chain
    loads from any working directory: the path as given (from the working directory now),
    and the path below the run's folder and each folder above it, nearest first (``--out
    runs/x`` from ``/p`` gives ``/p/runs/x/<stage>`` holding ``runs/x/<earlier stage>``: found
    below ``/p``). Only an existing run folder or .safetensors file is accepted; when the
    working directory's candidate and the nearest one above the run are both there but are
    different runs, which one the chain meant is unknown, so that is refused, not guessed."""
    import yaml

    cfg = f.parent / "config.yaml"
    if not cfg.is_file():
        return None
    given = ((yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("model") or {}).get("init_from")
    if not given:
        return None
    path = Path(given).expanduser()
    if path.is_absolute():
        tried = [path]
        found = path if path.exists() else None
    else:
        run = f.parent.absolute()
        tried = [Path.cwd() / path] + [d / path for d in (run, *run.parents)]
        here = tried[0] if _loadable(tried[0]) else None
        near = next((c for c in tried[1:] if _loadable(c)), None)
        if here is not None and near is not None and here.resolve() != near.resolve():
            raise FileNotFoundError(
                f"model.init_from: {f.parent} started from {given} ({cfg}), a path relative to the directory that "
                f"run was started from, which could be {here.resolve()} (from the working directory) or "
                f"{near.resolve()} (above the run): two different runs; write the right one as an absolute path "
                f"into {cfg}"
            )
        found = here or near
    if found is not None:
        return found.resolve()
    raise FileNotFoundError(
        f"model.init_from: {f.parent} started from {given} ({cfg}), which is not found (tried "
        f"{', '.join(str(c) for c in tried)}); the chain is loaded from its first run, so every earlier run "
        "must still be there"
    )


def beyond_the_model(model: torch.nn.Module, names: list[str]) -> list[str]:
    """The ``names`` (State names the model has no parameter for) that sit in a numbered
    block of one of the model's module lists past its end (``bert.encoder.layer.2.*`` for a
    2-layer model): a deeper model's tensors, not another head's, which may be left out."""
    lists = {n: len(m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}
    out = []
    for name in names:
        parts = base_name(name).split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in lists and parts[i].isdigit() and int(parts[i]) >= lists[parent]:
                out.append(name)
                break
    return out


def load_earlier(model: torch.nn.Module, path: str | Path, _seen: tuple[Path, ...] = ()) -> None:
    """Load, in chain order, the runs that ``path``'s run started from (not ``path`` itself):
    the weights that run trained from."""
    f = state_file(path)
    if f.resolve() in _seen:
        raise ValueError(f"model.init_from: {f} is reached twice in its own chain of earlier runs")
    parent = earlier_run(f)
    if parent is not None:  # a stage's final State holds what that stage trained, not what it started from
        load_init(model, parent, _seen=_seen + (f.resolve(),))


def load_init(model: torch.nn.Module, path: str | Path, chain: bool = True, _seen: tuple[Path, ...] = ()) -> dict[str, int]:
    """Copy the matching tensors of ``path``'s final State into ``model`` (in place), after
    those of the runs it started from (its config.yaml's ``model.init_from``, in chain
    order; ``chain=False`` when the caller loaded them, ``load_earlier``); returns
    ``{"copied": n, "skipped": m}`` for ``path`` (skipped: names the base model lacks)."""
    f = state_file(path)
    if chain:
        load_earlier(model, f, _seen)
    state = read_state_file(f, "model.init_from:")
    adapters = sorted(k for k in state if ADAPTER.search(k))
    if adapters:
        raise ValueError(
            f"model.init_from: {f} holds adapter tensors ({adapters[0]}, ... {len(adapters)} in all) that would "
            "need merging into the base weights; chain a stage trained with peft.method full or ffdapt"
        )
    from fedfm.peft.merge_selected import merge_selected

    merged = merge_selected(model, state, f)  # salience / sparse runs: selected entries into their weights
    params = dict(model.named_parameters())
    copied, skipped = len(merged), []
    with torch.no_grad():
        for name, t in state.items():
            if name in merged:
                continue
            target = params.get(base_name(name))
            if target is None:
                skipped.append(name)
                continue
            if tuple(t.shape) != tuple(target.shape):
                raise ValueError(f"model.init_from: '{name}' has shape {tuple(t.shape)} in {f}, the model has {tuple(target.shape)}")
            target.copy_(t.to(target.dtype))
            copied += 1
    if copied == 0:
        raise ValueError(f"model.init_from: none of the {len(state)} tensors of {f} names a parameter of the model (first: {next(iter(state), None)})")
    beyond = beyond_the_model(model, skipped)
    if beyond:
        raise ValueError(
            f"model.init_from: {f} holds '{beyond[0]}' ({len(beyond)} tensor(s) in all), a block of a module list "
            "this model holds fewer of: it was trained on a deeper model (another model.config_overrides or "
            "model.package/path); give this run the same model"
        )
    log.info("model.init_from: %d tensors copied from %s, %d without a place in this model (%s...)", copied, f, len(skipped), skipped[:2])
    return {"copied": copied, "skipped": len(skipped)}


def run_chain(stages: list[dict[str, Any]], out: str | Path, progress: bool = False, overwrite: bool = False) -> list[dict[str, Any]]:
    """Run the raw configs one after another under ``out/stage-<i>``; stage i+1 starts from
    stage i's final State. Returns each stage's summary."""
    from fedfm.config import from_dict
    from fedfm.runtime.local import run_local

    exps = []
    for i, raw in enumerate(stages):  # every config validated before the first stage trains
        raw = copy.deepcopy(raw)
        if i > 0:
            raw.setdefault("model", {})["init_from"] = absolute(Path(out) / f"stage-{i - 1}")
        exps.append(from_dict(raw, f"<stage {i}>"))
    return [run_local(exp, Path(out) / f"stage-{i}", progress=progress, overwrite=overwrite) for i, exp in enumerate(exps)]


def main(argv: list[str] | None = None) -> None:
    import yaml

    ap = argparse.ArgumentParser(description="Run configs as chained stages (each starts from the previous final State).")
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true", help="replace earlier runs in OUT/stage-<i>")
    args = ap.parse_args(argv)
    run_chain([yaml.safe_load(Path(c).read_text()) for c in args.configs], args.out, progress=True, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
