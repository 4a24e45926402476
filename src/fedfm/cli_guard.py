"""The guarded start of ``fedfm run`` and of stages files: Ctrl-C says how to continue, a user
error is printed and exits 1, and a start that failed is undone (runtime/rundir.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
# Errors that are the user's input (config, data, files, models), printed without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError, RuntimeError)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a user error (``error: ...``, markup escaped) and exit with ``code``."""
    console.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


Overrides = Annotated[Optional[list[str]], typer.Option("--override", "-o", help="dotted override, e.g. train.lr=1e-3")]


def load_experiment(config: Path, overrides: list[str] | None, stage: str | None = None):
    """The experiment of a config (or of one stage of a stages file), or its error printed and exit 2."""
    from fedfm.config import ConfigError, load_config
    from fedfm.stages import is_stages_file, pick_stage

    try:
        if stage is not None or is_stages_file(config):
            return pick_stage(config, overrides or [], stage)
        return load_config(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from None


def guarded(rd, start, resume_command, where: str = ""):
    """Run ``start()`` for run directory ``rd``: Ctrl-C says how to continue, a user error is
    printed (prefixed by ``where``) and exits 1, and a failed start is undone either way."""
    from fedfm.runtime.rundir import settle_failed_start

    try:
        return start()
    except KeyboardInterrupt:
        interrupted(rd, resume_command())
    except USER_ERRORS as exc:
        note = settle_failed_start(rd)
        console.print(f"[red]error:[/] {escape(where + str(exc))}")
        if note:
            console.print(escape(note))
        raise typer.Exit(1) from None
    except BaseException:
        settle_failed_start(rd)
        raise


def continue_command(config: Path, overrides: list[str] | None, out: Path) -> str:
    import shlex

    extra = "".join(f" -o {shlex.quote(o)}" for o in overrides or [])
    return f"fedfm run {shlex.quote(str(config))}{extra} --out {shlex.quote(str(out))} --resume"


def interrupted(rd, command: str) -> None:
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
