"""The ``fedfm`` command line: run (--resume; a stages file: cli_stages.py), check, report, data describe, list; flower (cli_flower.py), watermark (cli_watermark.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from fedfm.cli_flower import flower_app
from fedfm.cli_guard import USER_ERRORS, Overrides, console, continue_command, fail, guarded  # noqa: F401  (cli_stages reads cli.USER_ERRORS)
from fedfm.cli_guard import load_experiment as _load
from fedfm.cli_watermark import watermark_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated learning with foundation models.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect the data of an experiment.")
app.add_typer(data_app, name="data")
app.add_typer(flower_app, name="flower")
app.add_typer(watermark_app, name="watermark")

CONFIG_REFERENCE = 'Every config key: the "Config" section of README.md; a component\'s parameters: `fedfm list NAME`.'
# Errors a user's input can cause; anything else is a bug and keeps its traceback.


@app.command(epilog=CONFIG_REFERENCE)
def run(
    config: Path,
    override: Overrides = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory (default runs/<name>)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    resume: Annotated[bool, typer.Option(help="continue from the last complete round checkpointed in --out")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="replace the run in --out (its files are kept until the new run's first checkpoint)")
    ] = False,
):
    """Run a federated experiment from a YAML config.

    A run directory that already holds files is used only with --resume (continue it) or --overwrite (replace it).
    A stages file (a top-level `stages:` list, docs/adaptability.md) runs its stages in order into OUT/<stage name>;
    -o STAGE:KEY=VALUE overrides one stage, --resume skips finished stages.
    """
    from fedfm.runtime.rundir import RunDirError, complete_summary, drop_replaced, prepare_run_dir
    from fedfm.stages import is_stages_file

    if is_stages_file(config):  # a top-level stages: list (cli_stages.py)
        from fedfm.cli_stages import run_stages

        return run_stages(config, override, out, progress, resume, overwrite)
    exp = _load(config, override)
    out = out or Path("runs") / exp.name
    try:
        rd = prepare_run_dir(out, resume, overwrite)
    except RunDirError as exc:
        fail(str(exc), 2)
    if rd.resume_after is not None:
        console.print(escape(f"resuming {out} after round {rd.resume_after}"))
    elif resume:
        console.print(escape(f"--resume: nothing to resume in {out} (no files yet): starting the run"))

    def start() -> dict:
        _check_inputs(exp, out)
        return _execute(exp, out, progress, rd.mode == "resume", rd.mode == "overwrite")

    summary = guarded(rd, start, lambda: continue_command(config, override, out))
    drop_replaced(out)
    _done(exp, complete_summary(out, summary), out)


def _check_inputs(exp, out: Path) -> None:
    """Data, labels and input length checked, and what loads said, before the model loads."""
    _write_labels(_check_data(exp), exp, out)


def _write_labels(labels, exp, out: Path) -> None:
    from fedfm.runtime.outputs import write_labels

    if labels is not None:
        write_labels(out, labels.mapping, labels.num_labels, exp.data.label_column)


def _check_data(exp):
    """The data against the model (labels, input length); returns the labels (or None)."""
    from fedfm.attacks.checks import target_problems
    from fedfm.components import config_profile_keys
    from fedfm.core.profile_keys import unread_profile_keys
    from fedfm.data import build_federation, load_source, resolve_labels
    from fedfm.ip.preserve import check_public_data
    from fedfm.runtime.fault_outlook import dropout_outlook
    from fedfm.tracking.sinks import tracking_problems
    from fedfm.tasks.limits import validate_model_inputs

    console.print(escape(f"loading data: {_what_data(exp)}"))
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    labels = resolve_labels(exp, fed)
    targets = target_problems(exp) if labels is not None else []  # with num_labels inferred from the data too
    places = tracking_problems(exp)  # read only: a place the run could not write
    if targets or places:
        raise ValueError("; ".join(targets + places))
    if labels is not None:
        for line in labels.warnings:
            console.print(f"[yellow]warning:[/] {escape(line)}")
        shown = ", ".join(f"{name}={i}" for name, i in list(labels.mapping.items())[:10])
        console.print(escape(f"labels: {shown}{' ...' if len(labels.mapping) > 10 else ''} (model.num_labels {labels.num_labels})"))
    if exp.federation.client_holdout > 0:  # runtime/workbench.split_holdout keeps at least one example training
        alone = [c.cid for c in fed.clients if len(c.indices) < 2]
        if alone:
            console.print(f"[yellow]warning:[/] {escape(f'federation.client_holdout: client(s) {alone[:10]}')}"
                          f"{' ...' if len(alone) > 10 else ''} hold fewer than 2 examples: nothing is held out "
                          "for them, so they are not in the per-client evaluation")
    for line in check_public_data(exp):  # a server step's public text (ip/preserve.py)
        console.print(escape(f"public text of {line}"))
    for line in unread_profile_keys(exp, config_profile_keys(exp)):  # e.g. a rank that learner fedra never reads
        console.print(f"[yellow]warning:[/] {escape(line)}")
    _dp_outlook(exp)
    for line in dropout_outlook(exp):  # a round the dropout leaves below what it needs
        console.print(f"[yellow]warning:[/] {escape(line)}")
    console.print(escape(f"loading model: {_what_model(exp)}"))
    validate_model_inputs(exp, fed.frame)  # the rows as read above, not read again
    return labels


def _dp_outlook(exp) -> None:
    """The client-level DP plan (noise multiplier, epsilon over the planned rounds), and a
    warning when its noise swamps every update (privacy/outlook.py)."""
    from fedfm.privacy.outlook import dp_outlook

    lines, warnings = dp_outlook(exp)
    for line in lines:
        console.print(escape(f"privacy: {line}"))
    for line in warnings:
        console.print(f"[yellow]warning:[/] {escape(line)}")


def _check_model(exp, init_from: bool = True) -> int:
    """The tuner's and algorithm's names and shapes on the model built on the meta device
    (``runtime/skeleton.py``); returns the number of trainable tensors. ``init_from=False``:
    a later stage, whose ``model.init_from`` the stage before it writes."""
    from fedfm.runtime.algorithm import build_algorithm
    from fedfm.runtime.skeleton import check_against_model

    return check_against_model(exp, build_algorithm(exp), range(exp.federation.clients), init_from)


def _check_flower(exp) -> None:
    """What a Flower run checks where it starts: the simulation's resources on this machine,
    and the SuperNodes' key files (``runtime.flower.nodes``)."""
    if exp.runtime.backend != "flower":
        return
    from fedfm.runtime.flower.node_keys import key_problem

    problems = [p for p in [key_problem(exp.runtime.flower.nodes)] if p]
    if exp.runtime.flower.mode == "simulation":
        from fedfm.runtime.flower.simulation import resource_problems

        problems += resource_problems(exp)
    if problems:
        raise ValueError("; ".join(problems))


def _what_data(exp) -> str:
    d = exp.data
    where = f" {d.path}" if d.path else ""
    return f"{d.source}{where}, {exp.federation.clients} clients ({exp.federation.partitioner.name})"


def _what_model(exp) -> str:
    m = exp.model
    weights = "random init" if m.init == "random" else "pretrained weights"
    return f"{m.package or m.path} ({m.task}, {weights}, {m.dtype})"


def _execute(exp, out: Path, progress: bool, resume: bool, overwrite: bool = False) -> dict:
    if exp.runtime.backend == "flower":
        return _run_flower(exp, out, resume, overwrite)
    from fedfm.runtime import run_local

    return run_local(exp, out, progress=progress and exp.runtime.progress, resume=resume)


def _done(exp, summary: dict, out: Path) -> None:
    from fedfm.runtime.progress import format_duration

    final = summary["final"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if v is not None)
    parts = summary.get("parts") or []
    across = f" over {len(parts)} parts" if len(parts) > 1 else ""
    console.print(
        f"[green]done[/] {exp.name}: {shown}; up {summary['total_bytes_up']:,} B, "
        f"down {summary['total_bytes_down']:,} B; {format_duration(summary['wall_s'])}{across}; "
        f"peak RSS {summary['peak_rss_mb']:.0f} MB -> {out}"
    )
    _warn_skipped(summary, out)


def _warn_skipped(summary: dict, out: Path) -> None:
    """Say when rounds were skipped, with the first client failure (metrics.jsonl), so a
    config error that fails every client does not pass as a finished run."""
    import json

    skipped = summary.get("skipped_rounds") or []
    if not skipped:
        return
    first = None
    try:
        for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
            failed = json.loads(line).get("failed") or []
            if failed:
                first = failed[0]
                break
    except (OSError, ValueError):
        pass
    whole = len(skipped) >= summary.get("rounds", len(skipped) + 1)
    head = ("every round was skipped: no update was aggregated and the final model is the initial one"
            if whole else f"{len(skipped)} of {summary.get('rounds')} rounds skipped ({skipped[:10]})")
    cause = f"; first failure: client {first.get('cid')}: {first.get('error')}" if isinstance(first, dict) else ""
    console.print(f"[yellow]warning:[/] {escape(head + cause)} (metrics.jsonl: skipped, failed)")


def _run_flower(exp, out: Path, resume: bool = False, overwrite: bool = False) -> dict:
    """``runtime.backend: flower``: the Ray simulation here, or a run on a SuperLink."""
    import json

    from fedfm.runtime.flower import require_flwr

    require_flwr()
    if exp.runtime.flower.mode == "simulation":
        from fedfm.runtime.flower.simulation import run_flower_simulation

        return run_flower_simulation(exp, out, resume=resume)
    from fedfm.runtime.flower.deployment import run_failure, submit

    # the ServerApp on the SuperLink's machine writes OUT: it is told to replace a run there too
    done = submit(exp, out, resume=resume, overwrite=overwrite)
    if done.returncode != 0:  # its output was streamed as it came
        raise RuntimeError(f"the run on the SuperLink failed: {run_failure(done.stdout or '') or f'exit code {done.returncode}'}")
    summary = Path(out) / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"the run ended but {summary} is missing (the ServerApp writes it on the SuperLink machine)")
    return json.loads(summary.read_text())


@app.command(epilog=CONFIG_REFERENCE)
def check(config: Path, override: Overrides = None):
    """Check a config (or every stage of a stages file) as `fedfm run` does before it trains:
    the config and its components, the data against the model (labels, input length),
    public texts of server steps, and the tuner's and algorithm's names and shapes on the
    model built from its config on the meta device. Loads no weights and writes nothing."""
    from fedfm.stages import default_out, is_stages_file, load_stages

    if is_stages_file(config):
        from fedfm.config import ConfigError

        try:
            named = [(f"stage {st.name!r}: ", st.exp, st.index == 0)
                     for st in load_stages(config, default_out(config), override or [])[1]]
        except ConfigError as exc:
            console.print(f"[red]{escape(str(exc))}[/]")
            raise typer.Exit(2) from None
    else:
        named = [("", _load(config, override), True)]
    for where, exp, first in named:
        try:
            _check_data(exp)
            trainable = _check_model(exp, init_from=first)
            _check_flower(exp)
        except USER_ERRORS as exc:
            fail(f"{where}{exc}")
        fed = exp.federation
        console.print(escape(f"{where}ok: {exp.name}, {exp.rounds} rounds, {fed.clients} clients, "
                             f"learner {exp.learner.name}, aggregator {exp.aggregator.rule}, "
                             f"{trainable} trainable tensor{'' if trainable == 1 else 's'} ({exp.peft.method})"))


@data_app.command("describe")
def data_describe(
    config: Path,
    override: Overrides = None,
    stage: Annotated[Optional[str], typer.Option(help="the stage to describe, in a stages file")] = None,
):
    """Print one row per client: size, groups and label histogram; the label-to-id mapping
    and warnings (a client, training set or test set with one class only)."""
    exp = _load(config, override, stage)
    from fedfm.data import build_federation, describe, load_source, resolve_labels

    try:
        fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
        labels = resolve_labels(exp, fed)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    df = describe(fed)
    table = Table(title=f"{exp.name}: {len(fed.clients)} clients, partitioner {exp.federation.partitioner.name}")
    for col in df.columns:
        table.add_column(str(col), justify="right")
    for _, row in df.iterrows():
        table.add_row(*[escape(str(v)) for v in row.tolist()])
    console.print(table)
    if labels is not None:
        mapping = ", ".join(f"{name} -> {i}" for name, i in labels.mapping.items())
        console.print(escape(f"labels (label_<id> above): {mapping}; model.num_labels {labels.num_labels}"))
        for line in labels.warnings:
            console.print(f"[yellow]warning:[/] {escape(line)}")


@app.command()
def report(
    dirs: Annotated[list[Path], typer.Argument(help="one or more run directories (overlaid)")],
    out: Annotated[Optional[Path], typer.Option(help="output folder (default DIR/report, or ./report for several)")] = None,
):
    """Plot accuracy, loss, bytes and participation of runs into PNGs and a report.html."""
    from fedfm.report import build_report

    try:
        page = build_report(list(dirs), out)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(f"[green]report[/] -> {page}")


PROFILE = "federation.roles[].profile"


@app.command("list")
def list_components(
    name: Annotated[Optional[str], typer.Argument(help="a component (lora) or a YAML key (peft.method)")] = None,
    params: Annotated[bool, typer.Option("--params", help="show the parameters of every component")] = False,
):
    """List every registered component by the YAML key that selects it; with NAME (or
    --params), its parameters with their defaults and descriptions."""
    from fedfm.components import registries
    from fedfm.core.profile_keys import profile_keys

    regs = registries()
    if name is None and not params:
        for key, reg in regs.items():
            console.print(f"[bold]{key}[/]: {', '.join(reg.names())}")
        console.print(f"[bold]{PROFILE}[/] (keys, `fedfm list profile`): {', '.join(profile_keys())}")
        return
    if name in ("profile", PROFILE):
        table = Table(title=f"{PROFILE}: the keys fedfm reads", title_justify="left")
        for col in ("key", "what it means"):
            table.add_column(col)
        for key, what in profile_keys().items():
            table.add_row(key, escape(what))
        console.print(table)
        return
    if name is None:
        found = [(key, e) for key, reg in regs.items() for e in reg.entries()]
    elif name in regs or name in {k.split(".")[0] for k in regs}:
        found = [(key, e) for key, reg in regs.items() if name in (key, key.split(".")[0]) for e in reg.entries()]
    else:
        found = [(key, reg.get(name)) for key, reg in regs.items() if name in reg.names()]
    if not found:
        import difflib

        known = sorted({n for reg in regs.values() for n in reg.names()} | set(regs) | {"profile"})
        close = difflib.get_close_matches(name, known, n=3)
        console.print(f"[red]error:[/] no component or key '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
        raise typer.Exit(1)
    for key, entry in found:
        _print_params(key, entry)


def _print_params(key: str, entry) -> None:
    from pydantic_core import PydanticUndefined

    doc = " ".join((entry.doc or "").strip().split("\n\n")[0].split())
    table = Table(title=f"{key}: {entry.name}", caption=doc or None, title_justify="left")
    for col in ("parameter", "type", "default", "description"):
        table.add_column(col)
    for field_name, info in entry.params.model_fields.items():
        if info.default_factory is not None:
            default = repr(info.default_factory())
        else:
            default = "(required)" if info.default is PydanticUndefined else repr(info.default)
        table.add_row(field_name, _type_name(info.annotation), default, info.description or "")
    if not entry.params.model_fields:
        table.add_row("(no parameters)", "", "", "")
    console.print(table)


def _type_name(annotation) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and origin is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


# -- fedfm watermark: verify ownership of a model, trace a leaked one (fedfm.ip, docs/ip.md) --
