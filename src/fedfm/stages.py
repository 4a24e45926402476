"""A stages file: several experiments run one after the other from one YAML file, each
later stage starting from the previous stage's final model (``model.init_from``), e.g.
domain-adaptive pre-training (DAPT) chained into federated fine-tuning (Gururangan et
al. 2020, "Don't Stop Pretraining: Adapt Language Models to Domains and Tasks").

The file holds ``stages:`` (and optionally ``name:``, the default ``--out`` folder name)::

    name: dapt_then_finetune
    stages:
      - name: dapt                      # the stage's folder: OUT/dapt
        config: dapt.yaml               # a YAML file (relative to this file) ...
        overrides: [rounds=2]           # ... with dotted key=value overrides, as -o
      - name: finetune
        config: {model: {...}, ...}     # ... or the experiment itself

``fedfm run FILE --out OUT`` (``cli_stages.py``) runs them in order into ``OUT/<stage
name>/``; stage ``i + 1`` gets ``model.init_from: OUT/<stage i>``, made absolute (a
finished chain is loaded from any working directory). Here: the schema, the
loading with every check made before anything runs (``load_stages``), and what each
stage's folder allows (``plan``). Refused, with the stage named:

- a bad field in any stage (the experiment schema and its component checks, via
  ``config.from_dict``), a duplicate or malformed stage name, an unknown key at the top;
- ``model.init_from`` set in a stage after the first (the chain sets it: no precedence
  rule to remember; the first stage may set it to start the chain from another run, which
  must hold a final State: a missing or unfinished run is refused before anything runs);
- a stage whose base model (``model.package``/``path``, ``model.config_overrides``)
  differs from the previous stage's (the chain copies tensors by name and shape), and a
  previous stage whose tuner leaves adapter tensors (LoRA, prompts, ...) that
  ``model.init_from`` cannot load (``personalize/init_from.py``): checked before the first
  stage trains, not when the second starts;
- a Flower deployment stage (its final model is written on the SuperLink machine);
- a first stage whose ``model.init_from`` (or a run that run started from) lies in one of
  this file's stage folders under ``--out``: the chain would start from its own output;
- a stage ``config`` file that is itself a stages file (stages do not nest).

The data-against-model checks of ``fedfm run`` (labels, input length) are run on every
stage by the CLI before the first stage starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedfm.config import Experiment, from_dict
from fedfm.config_file import read_yaml
from fedfm.overrides import ConfigError, apply_overrides, format_errors

STAGE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
# Tuners whose final State holds adapter tensors rather than base-model weights.
ADAPTER_METHODS = frozenset({
    "lora", "ffa_lora", "adapter", "dual_adapter", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
    "personal_prompt", "fedapt", "diprompt",
})
# Keys of a stage's config.yaml a finished stage may differ in (as checkpoint.RESUMABLE_CHANGES, less rounds).
FREE_KEYS = ("runtime", "tracking", "name")


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=STAGE_NAME, description="the stage's folder under --out (letters, digits, _ and -); unique")
    config: str | dict[str, Any] = Field(
        description="the stage's experiment: a YAML file (relative to the stages file) or the experiment mapping itself"
    )
    overrides: list[str] = Field(default_factory=list, description="dotted key=value overrides of config, as -o")


class StagesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="default --out folder: runs/<name> (default: the file's stem)")
    stages: list[StageSpec] = Field(min_length=1, description="the experiments, run in this order")


@dataclass
class Stage:
    """One validated stage: its experiment (``model.init_from`` set by the chain) and folder."""

    index: int
    name: str
    exp: Experiment
    out: Path
    source: str  # where its config came from, for messages


def is_stages_file(path: str | Path) -> bool:
    """Whether ``path`` is a YAML mapping with a top-level ``stages`` key (False when unreadable)."""
    try:
        raw = read_yaml(path)
    except ConfigError:
        return False
    return isinstance(raw, dict) and "stages" in raw


def parse_stages_file(raw: Any, source: str) -> StagesFile:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid stages file {source}: the top level must be a mapping")
    try:
        spec = StagesFile(**raw)
    except ValidationError as exc:
        lines = format_errors(exc, StagesFile)
        if any(k not in ("name", "stages") for k in raw):
            lines.append("  (a stages file holds only name and stages; a stage's settings go under its config)")
        raise ConfigError(f"invalid stages file {source}:\n" + "\n".join(lines)) from None
    seen: dict[str, int] = {}
    for i, st in enumerate(spec.stages):
        if st.name in seen:
            raise ConfigError(f"invalid stages file {source}: stages.{i}.name '{st.name}' is also the name of stages.{seen[st.name]} "
                              "(each stage needs its own folder)")
        seen[st.name] = i
    return spec


def split_overrides(overrides: list[str], names: list[str]) -> dict[str | None, list[str]]:
    """``-o KEY=V`` applies to every stage, ``-o STAGE:KEY=V`` to that stage only."""
    out: dict[str | None, list[str]] = {None: []}
    for text in overrides:
        key = text.split("=", 1)[0]
        if ":" in key:
            stage, rest = text.split(":", 1)
            if stage not in names:
                raise ConfigError(f"override '{text}': no stage '{stage}' (stages: {', '.join(names)})")
            out.setdefault(stage, []).append(rest)
        else:
            out[None].append(text)
    return out


def _stage_raw(st: StageSpec, base_file: Path, where: str) -> tuple[dict[str, Any], str]:
    if isinstance(st.config, str):
        path = Path(st.config).expanduser()
        path = path if path.is_absolute() else base_file.parent / path
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: config {path}: the top level must be a mapping")
        if "stages" in raw:
            raise ConfigError(f"config {path} is itself a stages file; a stage's config is one experiment "
                              "(stages do not nest: list its stages in this file)")
        return raw, str(path)
    return copy.deepcopy(st.config), str(base_file)


def _model_key(exp: Experiment) -> dict[str, Any]:
    m = exp.model
    return {"package": m.package, "path": m.path, "config_overrides": m.config_overrides}


def chain_problem(prev: Stage, stage: Stage) -> str | None:
    """Why ``stage`` cannot start from ``prev``'s final model, or None."""
    if _model_key(prev.exp) != _model_key(stage.exp):
        return (f"its base model {_model_key(stage.exp)} differs from that of stage '{prev.name}' ({_model_key(prev.exp)}); "
                "the chain copies the previous stage's tensors by name and shape: give both the same "
                "model.package/model.path and model.config_overrides")
    method = prev.exp.peft.method
    if method in ADAPTER_METHODS:
        return (f"stage '{prev.name}' trains with peft.method {method}, whose final State holds adapter tensors that "
                "model.init_from cannot load (they would need merging into the weights): train a stage that "
                "another starts from with peft.method full or ffdapt (or learner fedbfpt with full)")
    return None


def chained_init(prev_out: Path, out: Path) -> str:
    """The ``model.init_from`` of the stage writing to ``out``: ``prev_out`` absolute and
    resolved, so the chain loads from any working directory (a later run, a benchmark).
    A stage interrupted before these paths were absolute has checkpoints whose config holds
    the same folder relative to the working directory; that spelling is kept, since
    ``--resume`` (the round loop) compares the config with the checkpoint's and would see a
    change where none is. (A finished stage's config.yaml is compared as absolute paths:
    ``config_difference``.)"""
    import json

    from fedfm.personalize.init_from import absolute
    from fedfm.runtime.checkpoint import PREFIX, Checkpointer

    want = absolute(prev_out)
    rounds = Checkpointer(out).rounds()
    if not rounds:
        return want
    try:
        info = json.loads((out / "checkpoints" / f"{PREFIX}{rounds[-1]:06d}" / "checkpoint.json").read_text())
        saved = info["config"]["model"]["init_from"]
    except (OSError, ValueError, KeyError, TypeError):
        return want
    if isinstance(saved, str) and not Path(saved).is_absolute() and absolute(saved) == want:
        return saved
    return want


def written_by_chain(init_from: str, folders: dict[str, Path]) -> str | None:
    """How the run at ``init_from``, or a run it started from (its config.yaml's
    ``model.init_from``, followed back), lies in one of the stages' ``folders``, or None."""
    from fedfm.personalize.init_from import earlier_run, state_file

    roots = {name: folder.expanduser().resolve() for name, folder in folders.items()}
    f: Path | None = state_file(init_from).resolve()
    seen: set[Path] = set()
    while f is not None and f not in seen:
        seen.add(f)
        for name, root in roots.items():
            if f == root or root in f.parents:
                how = "is" if len(seen) == 1 else "started from a run that is"
                return f"{how} in the folder of stage '{name}' ({root})"
        try:
            f = earlier_run(f)
            f = state_file(f).resolve() if f is not None else None
        except (FileNotFoundError, ValueError, OSError):
            return None  # an unreadable chain is refused where it is loaded (fedfm check, the run)
    return None


def load_stages(path: str | Path, out: str | Path, overrides: list[str] | None = None) -> tuple[StagesFile, list[Stage]]:
    """Every stage validated (schema, components, chain) before anything runs; the error
    names the stage and the field. Stage ``i + 1`` gets ``model.init_from: OUT/<stage i>``
    (absolute: ``chained_init``)."""
    path, out = Path(path), Path(out)
    spec = parse_stages_file(read_yaml(path), str(path))
    names = [st.name for st in spec.stages]
    extra = split_overrides(list(overrides or []), names)
    stages: list[Stage] = []
    for i, st in enumerate(spec.stages):
        where = f"stage '{st.name}' (stages.{i} of {path})"
        ovs = st.overrides + extra[None] + extra.get(st.name, [])
        try:
            raw, source = _stage_raw(st, path, where)
            raw.setdefault("name", st.name)
            given = (apply_overrides(raw, ovs).get("model") or {}).get("init_from")
            if stages and given is not None:
                raise ConfigError(
                    f"model.init_from is set ({given}), but the chain starts this stage from stage "
                    f"'{stages[-1].name}' ({stages[-1].out}): remove it (only the first stage may set model.init_from)"
                )
            if stages:
                model = raw.setdefault("model", {})
                if not isinstance(model, dict):
                    raise ConfigError("model: must be a mapping")
                model["init_from"] = chained_init(stages[-1].out, out / st.name)
            exp = from_dict(raw, source, ovs)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if not stages and exp.model.init_from:
            from fedfm.personalize.init_from import state_file

            try:  # the run the chain starts from: every later stage loads it too (load_earlier)
                state_file(exp.model.init_from)
            except FileNotFoundError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            inside = written_by_chain(exp.model.init_from, {n: out / n for n in names})
            if inside:
                raise ConfigError(f"{where}: model.init_from {exp.model.init_from} {inside}, which this file's stages "
                                  "write: the chain would start from its own output (a cycle); start it from a run "
                                  "outside --out, or choose another --out")
        stage = Stage(i, st.name, exp, out / st.name, source)
        if exp.runtime.backend == "flower" and exp.runtime.flower.mode != "simulation":
            raise ConfigError(f"{where}: runtime.flower.mode {exp.runtime.flower.mode}: a stages file runs locally or "
                              "in the Flower simulation (a deployment writes its final model on the SuperLink machine)")
        if stages:
            problem = chain_problem(stages[-1], stage)
            if problem:
                raise ConfigError(f"{where}: {problem}")
        stages.append(stage)
    return spec, stages


def default_out(path: str | Path) -> Path:
    """``runs/<name>`` (the file's ``name:``, else its stem)."""
    path = Path(path)
    raw = read_yaml(path)
    name = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else None
    return Path("runs") / (name or path.stem)


def pick_stage(path: str | Path, overrides: list[str], name: str | None, out: str | Path | None = None) -> Experiment:
    """One stage's experiment (every stage validated), for commands that take one experiment
    (``fedfm data describe FILE --stage NAME``)."""
    spec = parse_stages_file(read_yaml(path), str(path))
    names = [st.name for st in spec.stages]
    if name is None:
        raise ConfigError(f"{path} is a stages file ({', '.join(names)}): run it with `fedfm run`, or give one stage "
                          "with --stage NAME where the command has that option")
    if name not in names:
        raise ConfigError(f"{path}: no stage '{name}' (stages: {', '.join(names)})")
    _, stages = load_stages(path, out or default_out(path), overrides)
    return stages[names.index(name)].exp


# -- what each stage's folder allows ------------------------------------------------


def finished(stage: Stage) -> bool:
    """A stage is finished when its final model exists."""
    return (stage.out / "final.safetensors").is_file()


def config_difference(stage: Stage) -> list[str]:
    """Where a finished stage's config.yaml differs from the stage's config now, field by field
    (``runtime/checkpoint.config_changes``; ``model.init_from`` compared as absolute paths:
    config.yaml records it so)."""
    from fedfm.personalize.init_from import recorded
    from fedfm.runtime.checkpoint import config_changes

    try:
        saved = yaml.safe_load((stage.out / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ["config.yaml (missing or unreadable)"]
    if not isinstance(saved, dict):
        return ["config.yaml (not a mapping)"]
    saved, now = recorded(saved), recorded(stage.exp.dump())
    return config_changes({k: v for k, v in saved.items() if k not in FREE_KEYS},
                          {k: v for k, v in now.items() if k not in FREE_KEYS})


def plan(stages: list[Stage], resume: bool, overwrite: bool) -> list[str]:
    """What to do with each stage: ``skip`` (finished, --resume), ``resume``, ``new`` or
    ``overwrite``; or a ConfigError naming the stage, before anything runs or moves."""
    from fedfm.runtime.rundir import RUN_FILES, RunDirError, checkpointed_rounds

    if resume and overwrite:
        raise RunDirError("give at most one of --resume and --overwrite")
    actions: list[str] = []
    for st in stages:
        out = st.out
        if out.exists() and not out.is_dir():
            raise RunDirError(f"stage '{st.name}': {out} is a file, not a directory")
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if overwrite:
            if entries and not any((out / n).exists() for n in RUN_FILES) and not any(n.startswith(".replaced-") for n in entries):
                raise RunDirError(f"stage '{st.name}': --overwrite: {out} does not look like a fedfm run directory "
                                  f"(it holds {', '.join(entries[:6])}); refusing to replace it: choose another --out")
            actions.append("overwrite" if entries else "new")
            continue
        if not resume:
            if entries:
                raise RunDirError(
                    f"stage '{st.name}': {out} already holds files ({', '.join(entries[:6])}): pass --resume to go on "
                    "(finished stages are skipped, an interrupted one continues), or --overwrite to run every stage "
                    "again, or choose another --out"
                )
            actions.append("new")
            continue
        earlier_open = any(a != "skip" for a in actions)
        if finished(st):
            differ = config_difference(st)
            if differ:
                raise RunDirError(f"stage '{st.name}' finished in {out} with another config ({'; '.join(differ)}): "
                                  "pass --overwrite to run the stages again, or choose another --out")
            if earlier_open:
                raise RunDirError(f"stage '{st.name}' is finished in {out}, but an earlier stage is not: it started from "
                                  "a model that is about to change; pass --overwrite to run the stages again")
            actions.append("skip")
        elif checkpointed_rounds(out):
            if earlier_open:
                raise RunDirError(f"stage '{st.name}' has checkpoints in {out}, but an earlier stage is not finished: "
                                  "pass --overwrite to run the stages again")
            actions.append("resume")
        elif entries:
            raise RunDirError(f"stage '{st.name}': --resume: {out} holds no checkpoint and no final model "
                              f"(files: {', '.join(entries[:6])}); pass --overwrite to run the stages again there")
        else:
            actions.append("new")
    return actions
