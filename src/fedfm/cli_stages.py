"""``fedfm run STAGES.yaml --out OUT``: the stages of a stages file (``stages.py``) run one
after the other into ``OUT/<stage name>/``, each later stage starting from the previous
stage's final model.

Before the first stage trains: every stage's config is validated (``load_stages``), the
data of every stage is checked against its model as ``fedfm run`` checks one config
(labels, input length), every stage's tuner and algorithm against its model's names and
shapes on the meta device (``runtime/skeleton.py``), and every stage's folder is checked against the flags (``plan``).
Then each stage runs as ``fedfm run`` runs one config: ``--overwrite`` replaces a stage's
earlier run (kept until the new one's first checkpoint), ``--resume`` skips finished
stages (final model present, same config) and continues an interrupted one from its last
checkpoint; Ctrl-C says how to go on.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from fedfm.cli_guard import fail


def run_stages(config: Path, overrides: list[str] | None, out: Path | None, progress: bool, resume: bool,
               overwrite: bool) -> None:
    from fedfm import cli
    from fedfm.overrides import ConfigError
    from fedfm.runtime.rundir import RunDirError, complete_summary, drop_replaced, prepare_run_dir
    from fedfm.stages import default_out, load_stages, plan

    console = cli.console
    try:
        out = out or default_out(config)
        _, stages = load_stages(config, out, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from None
    labels = {}
    for st in stages:
        console.print(escape(f"stage {st.name} ({st.index + 1} of {len(stages)}): checking"))
        try:
            labels[st.name] = cli._check_data(st.exp)
            cli._check_model(st.exp, init_from=st.index == 0)  # a later stage's name errors surface before the first trains
        except cli.USER_ERRORS as exc:
            fail(f"stage {st.name!r}: {exc}")
    try:
        actions = plan(stages, resume, overwrite)
    except RunDirError as exc:
        fail(str(exc), 2)
    for st, action in zip(stages, actions):
        head = f"stage {st.name} ({st.index + 1} of {len(stages)})"
        if action == "skip":
            console.print(escape(f"{head}: finished in {st.out}, skipped"))
            continue
        rd = prepare_run_dir(st.out, action == "resume", action == "overwrite")
        start = f", resuming after round {rd.resume_after}" if rd.resume_after is not None else ""
        console.print(escape(f"{head} -> {st.out}{start}"))
        def start(st=st, rd=rd) -> dict:
            cli._write_labels(labels[st.name], st.exp, st.out)
            return cli._execute(st.exp, st.out, progress, rd.mode == "resume")

        summary = cli.guarded(rd, start, lambda: cli.continue_command(config, overrides, out), f"stage {st.name!r}: ")
        drop_replaced(st.out)
        cli._done(st.exp, complete_summary(st.out, summary), st.out)
    console.print(escape(f"stages done: {', '.join(st.name for st in stages)} -> {out}"))
