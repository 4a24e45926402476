"""The ``fedfm`` command line: run (--resume), report, data describe, list, flower."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfm.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated learning with foundation models.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect the data of an experiment.")
app.add_typer(data_app, name="data")
flower_app = typer.Typer(no_args_is_help=True, help="Run experiments on Flower (see docs/distributed.md).")
app.add_typer(flower_app, name="flower")
console = Console()

Overrides = Annotated[Optional[list[str]], typer.Option("--override", "-o", help="dotted override, e.g. train.lr=1e-3")]


def _load(config: Path, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from None


CONFIG_REFERENCE = 'Every config key: the "Config" section of README.md; a component\'s parameters: `fedfm list NAME`.'
# Errors a user's input can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError, RuntimeError)


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
    """
    from fedfm.runtime.rundir import RunDirError, complete_summary, drop_replaced, prepare_run_dir, settle_failed_start

    exp = _load(config, override)
    out = out or Path("runs") / exp.name
    try:
        rd = prepare_run_dir(out, resume, overwrite)
    except RunDirError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if rd.resume_after is not None:
        console.print(escape(f"resuming {out} after round {rd.resume_after}"))
    try:
        _check_inputs(exp, out)
        summary = _execute(exp, out, progress, rd.mode == "resume")
    except KeyboardInterrupt:
        _interrupted(rd, _continue_command(config, override, out))
    except USER_ERRORS as exc:
        note = settle_failed_start(rd)
        console.print(f"[red]error:[/] {escape(str(exc))}")
        if note:
            console.print(escape(note))
        raise typer.Exit(1) from None
    except BaseException:
        settle_failed_start(rd)
        raise
    drop_replaced(out)
    _done(exp, complete_summary(out, summary), out)


def _check_inputs(exp, out: Path) -> None:
    """Data, labels and input length checked, and what loads said, before the model loads."""
    from fedfm.data import build_federation, load_source, resolve_labels
    from fedfm.runtime.outputs import write_labels
    from fedfm.tasks.limits import validate_model_inputs

    console.print(escape(f"loading data: {_what_data(exp)}"))
    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    labels = resolve_labels(exp, fed)
    if labels is not None:
        for line in labels.warnings:
            console.print(f"[yellow]warning:[/] {escape(line)}")
        shown = ", ".join(f"{name}={i}" for name, i in list(labels.mapping.items())[:10])
        console.print(escape(f"labels: {shown}{' ...' if len(labels.mapping) > 10 else ''} (model.num_labels {labels.num_labels})"))
    console.print(escape(f"loading model: {_what_model(exp)}"))
    validate_model_inputs(exp)
    if labels is not None:
        write_labels(out, labels.mapping, labels.num_labels, exp.data.label_column)


def _what_data(exp) -> str:
    d = exp.data
    where = f" {d.path}" if d.path else ""
    return f"{d.source}{where}, {exp.federation.clients} clients ({exp.federation.partitioner.name})"


def _what_model(exp) -> str:
    m = exp.model
    weights = "random init" if m.init == "random" else "pretrained weights"
    return f"{m.package or m.path} ({m.task}, {weights}, {m.dtype})"


def _execute(exp, out: Path, progress: bool, resume: bool) -> dict:
    if exp.runtime.backend == "flower":
        return _run_flower(exp, out, resume)
    from fedfm.runtime import run_local

    return run_local(exp, out, progress=progress and exp.runtime.progress, resume=resume)


def _continue_command(config: Path, overrides: list[str] | None, out: Path) -> str:
    import shlex

    extra = "".join(f" -o {shlex.quote(o)}" for o in overrides or [])
    return f"fedfm run {shlex.quote(str(config))}{extra} --out {shlex.quote(str(out))} --resume"


def _interrupted(rd, command: str) -> None:
    """Ctrl-C: say where the run stopped and how to go on; a start cut short is undone."""
    from fedfm.runtime.rundir import checkpointed_rounds, last_round, settle_failed_start

    note = settle_failed_start(rd)
    n = last_round(rd.path) if note is None else None
    if n is None:
        console.print(f"[yellow]interrupted[/] before the first round was saved{'; ' + escape(note) if note else ''}")
    elif not checkpointed_rounds(rd.path):
        console.print(f"[yellow]interrupted[/] after round {n}; checkpoints are off (server.checkpoint), so it cannot be resumed")
    else:
        console.print(f"[yellow]interrupted[/] after round {n}; continue with: {escape(command)}")
    raise typer.Exit(130)


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


def _run_flower(exp, out: Path, resume: bool = False) -> dict:
    """``runtime.backend: flower``: the Ray simulation here, or a run on a SuperLink."""
    import json

    from fedfm.runtime.flower import require_flwr

    require_flwr()
    if exp.runtime.flower.mode == "simulation":
        from fedfm.runtime.flower.simulation import run_flower_simulation

        return run_flower_simulation(exp, out, resume=resume)
    from fedfm.runtime.flower.deployment import submit

    done = submit(exp, out, resume=resume)
    if done.returncode != 0:
        raise RuntimeError(f"flwr run failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    summary = Path(out) / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"the run ended but {summary} is missing (the ServerApp writes it on the SuperLink machine)")
    return json.loads(summary.read_text())


@flower_app.command("export-partitions")
def flower_export(
    config: Path,
    out: Annotated[Path, typer.Option(help="directory for client_<cid>.parquet")],
    override: Overrides = None,
):
    """Write one data file per client, cut as the local backend cuts the source."""
    exp = _load(config, override)
    from fedfm.runtime.flower.deployment import export_partitions

    for path in export_partitions(exp, out):
        console.print(str(path))


@flower_app.command("connection")
def flower_connection(
    name: str,
    address: str,
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA certificate (PEM) of the SuperLink")] = None,
    insecure: Annotated[bool, typer.Option(help="no TLS: loopback demos only")] = False,
    flwr_home: Annotated[Optional[Path], typer.Option(envvar="FLWR_HOME", help="default ~/.flwr")] = None,
):
    """Add a SuperLink connection to the Flower Configuration (used by `flwr run`)."""
    from fedfm.runtime.flower.deployment import write_connection

    home = flwr_home or Path.home() / ".flwr"
    console.print(str(write_connection(home, name, address, root_certificates, insecure)))


@flower_app.command("submit")
def flower_submit(
    config: Path,
    superlink: Annotated[Optional[str], typer.Option(help="connection name (default: runtime.flower.superlink)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory on the SuperLink machine")] = None,
    override: Overrides = None,
):
    """`flwr run` the shipped app on a running SuperLink, the experiment in the run config."""
    exp = _load(config, override)
    from fedfm.runtime.flower.deployment import submit

    done = submit(exp, out or Path("runs") / exp.name, superlink)
    console.print(done.stdout + done.stderr)
    raise typer.Exit(done.returncode)


@flower_app.command("keys")
def flower_keys(
    out: Annotated[Path, typer.Option(help="directory for node-<cid> (private) and node-<cid>.pub")],
    clients: Annotated[int, typer.Option(help="how many client ids (0..clients-1)")],
):
    """Make one SuperNode key pair per client (EC P-384, OpenSSH) and print the
    runtime.flower.nodes block that binds each client id to its public key."""
    from fedfm.runtime.flower.node_keys import generate_node_key

    console.print("runtime:\n  flower:\n    nodes:")
    for cid in range(clients):
        _, public = generate_node_key(out, f"node-{cid}")
        console.print(f"      {cid}: {public.resolve()}")


@flower_app.command("register")
def flower_register(
    config: Path,
    superlink: Annotated[Optional[str], typer.Option(help="connection name (default: runtime.flower.superlink)")] = None,
    override: Overrides = None,
):
    """Register every public key of runtime.flower.nodes on the SuperLink (`flwr supernode
    register`; the SuperLink runs with --enable-supernode-auth) and print the node ids."""
    import tempfile

    exp = _load(config, override)
    from fedfm.runtime.flower.node_keys import key_text, register_keys

    if not exp.runtime.flower.nodes:
        console.print("[red]error:[/] runtime.flower.nodes is empty: nothing to register")
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for cid, value in exp.runtime.flower.nodes.items():
            files[cid] = Path(tmp) / f"node-{cid}.pub"
            files[cid].write_text(key_text(value) + "\n")
        try:
            ids = register_keys(files, superlink or exp.runtime.flower.superlink)
        except RuntimeError as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
    for cid, node in ids.items():
        console.print(f"client {cid}: node {node}")


@data_app.command("describe")
def data_describe(config: Path, override: Overrides = None):
    """Print one row per client: size, groups and label histogram; the label-to-id mapping
    and warnings (a client, training set or test set with one class only)."""
    exp = _load(config, override)
    from fedfm.data import build_federation, describe, load_source, resolve_labels

    try:
        fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
        labels = resolve_labels(exp, fed)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
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
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"[green]report[/] -> {page}")


@app.command("list")
def list_components(
    name: Annotated[Optional[str], typer.Argument(help="a component (lora) or a YAML key (peft.method)")] = None,
    params: Annotated[bool, typer.Option("--params", help="show the parameters of every component")] = False,
):
    """List every registered component by the YAML key that selects it; with NAME (or
    --params), its parameters with their defaults and descriptions."""
    from fedfm.components import registries

    regs = registries()
    if name is None and not params:
        for key, reg in regs.items():
            console.print(f"[bold]{key}[/]: {', '.join(reg.names())}")
        return
    if name is None:
        found = [(key, e) for key, reg in regs.items() for e in reg.entries()]
    elif name in regs or name in {k.split(".")[0] for k in regs}:
        found = [(key, e) for key, reg in regs.items() if name in (key, key.split(".")[0]) for e in reg.entries()]
    else:
        found = [(key, reg.get(name)) for key, reg in regs.items() if name in reg.names()]
    if not found:
        import difflib

        known = sorted({n for reg in regs.values() for n in reg.names()} | set(regs))
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
watermark_app = typer.Typer(no_args_is_help=True, help="Verify a model's watermark and trace a leaked one (docs/ip.md).")
app.add_typer(watermark_app, name="watermark")
WmConfig = Annotated[Optional[Path], typer.Option(help="config.yaml of the run (default: the one beside the weights)")]
WmSize = Annotated[Optional[int], typer.Option(help="trigger examples (default: the run's waffle step, else 50)")]
WmLength = Annotated[Optional[int], typer.Option(help="random tokens per trigger (default: the run's waffle step, else 12)")]
WmCont = Annotated[Optional[int], typer.Option(help="causal LM: continuation tokens (default: the run's waffle step, else 4)")]


def _secret(key: str | None, key_env: str | None) -> str:
    import os

    if (key is None) == (key_env is None):
        console.print("[red]error:[/] give exactly one of --key or --key-env")
        raise typer.Exit(2)
    value = key if key is not None else os.environ.get(key_env, "")
    if not value:
        console.print(f"[red]error:[/] environment variable {key_env} (--key-env) is not set or empty")
        raise typer.Exit(2)
    return value


def _suspect(model: Path, config: Path | None, size, length, cont, steps=("waffle",)):
    from fedfm.ip.loading import load_suspect, trigger_spec

    try:
        exp, base, state = load_suspect(model, config)
        return base, state, trigger_spec(exp, size, length, cont, steps)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


@watermark_app.command("verify")
def watermark_verify(
    model: Annotated[Path, typer.Argument(help="a run directory, or a .safetensors file beside its config.yaml")],
    key: Annotated[Optional[str], typer.Option(help="the secret watermark key")] = None,
    key_env: Annotated[Optional[str], typer.Option(help="environment variable holding the key")] = None,
    config: WmConfig = None,
    trigger_size: WmSize = None,
    trigger_length: WmLength = None,
    continuation: WmCont = None,
    alpha: Annotated[float, typer.Option(help="largest p-value that counts as verified")] = 1e-6,  # ip.waffle.DEFAULT_ALPHA
):
    """Watermark accuracy on the key's trigger set and its binomial p-value against chance.

    Exit status 0 when verified (p < alpha), 1 when not."""
    from fedfm.ip import trigger_set, verdict
    from fedfm.peft import set_state

    secret = _secret(key, key_env)
    base, state, spec = _suspect(model, config, trigger_size, trigger_length, continuation)
    set_state(base.model, state)
    v = verdict(base.task, spec, base.model, base.tokenizer, trigger_set(secret, spec, base.tokenizer))
    ok = v.verified(alpha)
    console.print(
        f"watermark accuracy {v.accuracy:.4f} ({v.hits}/{v.total}), chance {v.chance:.4g}, "
        f"p-value {v.p_value:.3g}: " + ("[green]verified[/]" if ok else "[yellow]not verified[/]") + f" (alpha {alpha:g})"
    )
    raise typer.Exit(0 if ok else 1)


@watermark_app.command("trace")
def watermark_trace(
    model: Annotated[Path, typer.Argument(help="the leaked model: a run directory or a .safetensors file")],
    keys: Annotated[Optional[list[str]], typer.Option("--keys", help="one client key per option, client ids 0, 1, ...")] = None,
    key: Annotated[Optional[str], typer.Option(help="master key: client keys are derived from it (with --clients)")] = None,
    clients: Annotated[Optional[int], typer.Option(help="number of clients, ids 0..N-1 (with --key)")] = None,
    config: WmConfig = None,
    trigger_size: WmSize = None,
    trigger_length: WmLength = None,
    continuation: WmCont = None,
):
    """Name the client whose key the leaked model answers best, with every client's figures."""
    from fedfm.ip import client_key, trace_keys

    if bool(keys) == (key is not None) or (key is not None) != (clients is not None):
        console.print("[red]error:[/] give either --keys K0 --keys K1 ... or --key MASTER --clients N")
        raise typer.Exit(2)
    labelled = dict(enumerate(keys)) if keys else {c: client_key(key, c) for c in range(clients)}
    base, state, spec = _suspect(model, config, trigger_size, trigger_length, continuation, ("client_watermark", "waffle"))
    result = trace_keys(base, state, labelled, spec)
    table = Table(title=f"watermark of each client on {model}")
    for col in ("client", "hits", "accuracy", "p-value"):
        table.add_column(col, justify="right")
    for cid, v in result.verdicts.items():
        table.add_row(str(cid), f"{v.hits}/{v.total}", f"{v.accuracy:.4f}", f"{v.p_value:.3g}")
    console.print(table)
    console.print(f"suspect: client {result.suspect} (p-value {result.p_value:.3g})")


if __name__ == "__main__":
    app()
