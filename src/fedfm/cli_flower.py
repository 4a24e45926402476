"""``fedfm flower ...``: the commands of a Flower deployment (docs/distributed.md): client
data files, SuperLink connections, node keys and their registration, and submitting a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedfm.cli_guard import Overrides, console, fail
from fedfm.cli_guard import load_experiment as _load

flower_app = typer.Typer(no_args_is_help=True, help="Run experiments on Flower (see docs/distributed.md).")


@flower_app.command("export-partitions")
def flower_export(
    config: Path,
    out: Annotated[Path, typer.Option(help="directory for client_<cid>.parquet")],
    override: Overrides = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace client files already in --out")] = False,
):
    """Write one data file per client, cut as the local backend cuts the source."""
    exp = _load(config, override)
    from fedfm.runtime.flower.deployment import export_partitions

    try:
        paths = export_partitions(exp, out, overwrite=overwrite)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    except OSError as exc:  # --out under a file, no permission, ...
        fail(f"--out {out}: {exc.strerror or exc}")
    for path in paths:
        console.print(str(path))


@flower_app.command("connection")
def flower_connection(
    name: str,
    address: str,
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA certificate (PEM) of the SuperLink")] = None,
    insecure: Annotated[bool, typer.Option(help="no TLS: loopback demos only")] = False,
    flwr_home: Annotated[Optional[Path], typer.Option(envvar="FLWR_HOME", help="default ~/.flwr")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a connection of the same name")] = False,
):
    """Add a SuperLink connection to the Flower Configuration (used by `flwr run`)."""
    from fedfm.runtime.flower.deployment import write_connection

    home = flwr_home or Path.home() / ".flwr"
    try:
        path = write_connection(home, name, address, root_certificates, insecure, overwrite)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(str(path))


@flower_app.command("submit")
def flower_submit(
    config: Path,
    superlink: Annotated[Optional[str], typer.Option(help="connection name (default: runtime.flower.superlink)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory on the SuperLink machine")] = None,
    override: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the run in --out")] = False,
):
    """`flwr run` the shipped app on a running SuperLink, the experiment in the run config
    (always as a deployment: runtime.backend flower, runtime.flower.mode deployment). The
    output streams as it comes; a run whose ServerApp failed exits 1 with its error."""
    exp = _load(config, override)
    from fedfm.config import ConfigError
    from fedfm.runtime.flower.deployment import run_failure, submit

    if resume and overwrite:
        fail("give at most one of --resume and --overwrite", 2)
    try:
        done = submit(exp, out or Path("runs") / exp.name, superlink, resume=resume, overwrite=overwrite)
    except (ValueError, ConfigError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    except OSError as exc:  # --out is a file, or under one, ...
        fail(f"--out {out or Path('runs') / exp.name}: {exc.strerror or exc}", 2)
    if done.returncode != 0:
        why = run_failure(done.stdout) or f"flwr run exited with {done.returncode}"
        fail(f"the run on SuperLink '{superlink or exp.runtime.flower.superlink}' failed: {why}")


@flower_app.command("keys")
def flower_keys(
    out: Annotated[Path, typer.Option(help="directory for node-<cid> (private) and node-<cid>.pub")],
    clients: Annotated[int, typer.Option(min=1, help="how many client ids (0..clients-1)")],
):
    """Make one SuperNode key pair per client (EC P-384, OpenSSH) and print the
    runtime.flower.nodes block that binds each client id to its public key. Key files
    already in --out are never replaced: nothing is written then."""
    from fedfm.runtime.flower.node_keys import existing_keys, generate_node_key

    names = [f"node-{cid}" for cid in range(clients)]
    there = existing_keys(out, names) if out.is_dir() else []
    problem = f"--out {out} is a file, not a folder" if out.exists() and not out.is_dir() else None
    if there:
        more = f", ... ({len(there)} in all)" if len(there) > 4 else ""
        problem = f"--out {out} already holds {', '.join(there[:4])}{more}; a node key is never replaced: pick another --out"
    if problem is not None:
        fail(problem)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # under a file, no permission, ...
        fail(f"--out {out}: {exc.strerror or exc}")
    console.print("runtime:\n  flower:\n    nodes:")
    for cid, name in enumerate(names):
        _, public = generate_node_key(out, name)
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
    from fedfm.runtime.flower.node_keys import key_problem, key_text, register_keys

    if not exp.runtime.flower.nodes:
        console.print("[red]error:[/] runtime.flower.nodes is empty: nothing to register")
        raise typer.Exit(2)
    problem = key_problem(exp.runtime.flower.nodes)
    if problem is not None:
        fail(problem, 2)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for cid, value in exp.runtime.flower.nodes.items():
            files[cid] = Path(tmp) / f"node-{cid}.pub"
            files[cid].write_text(key_text(value) + "\n")
        try:
            ids = register_keys(files, superlink or exp.runtime.flower.superlink)
        except RuntimeError as exc:
            fail(str(exc))
    for cid, node in ids.items():
        console.print(f"client {cid}: node {node}")
