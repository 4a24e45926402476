"""``fedfm watermark verify``, ``trace`` and ``copy`` (docs/ip.md): check a model's WAFFLE
watermark, trace a leaked copy to the client it was sent to, and write a client's copy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedfm.config import ConfigError

console = Console()

watermark_app = typer.Typer(no_args_is_help=True, help="Verify a model's watermark and trace a leaked one (docs/ip.md).")
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


def unit(spec) -> str:
    """How the hits are counted: triggers (or tokens), or one majority vote per pattern."""
    return " patterns voted" if spec.kind == "pattern" else ""


def _suspect(model: Path, config: Path | None, size, length, cont, steps=("waffle",)):
    from fedfm.ip.loading import load_suspect, trigger_spec

    try:
        exp, base, state = load_suspect(model, config)
        spec = trigger_spec(exp, size, length, cont, steps)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if not any(isinstance(s, dict) and s.get("name") in steps for s in exp.server_steps):
        console.print(f"note: the config of {model} has no {' or '.join(steps)} step (a run without a watermark?); "
                      f"checking {spec.size} triggers of {spec.length} tokens (--trigger-size, --trigger-length, "
                      "else the defaults)")
    return base, state, spec


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
        f"watermark accuracy {v.accuracy:.4f} ({v.hits}/{v.total}{unit(spec)}), chance {v.chance:.4g}, "
        f"p-value {v.p_value:.3g}: " + ("[green]verified[/]" if ok else "[yellow]not verified[/]") + f" (alpha {alpha:g})"
    )
    raise typer.Exit(0 if ok else 1)


@watermark_app.command("trace")
def watermark_trace(
    model: Annotated[Path, typer.Argument(help="the leaked model: a run directory or a .safetensors file")],
    keys: Annotated[Optional[list[str]], typer.Option("--keys", help="one client key per option, client ids 0, 1, ...")] = None,
    key: Annotated[Optional[str], typer.Option(help="master key: client keys are derived from it (with --clients)")] = None,
    key_env: Annotated[Optional[str], typer.Option(help="environment variable holding the master key (instead of --key)")] = None,
    clients: Annotated[Optional[int], typer.Option(help="number of clients, ids 0..N-1 (with --key or --key-env)")] = None,
    config: WmConfig = None,
    trigger_size: WmSize = None,
    trigger_length: WmLength = None,
    continuation: WmCont = None,
    alpha: Annotated[float, typer.Option(help="largest adjusted p-value that counts as traced")] = 1e-6,
):
    """Name the client whose key the leaked model answers best, with every client's figures.

    The table gives each key's own binomial p-value; the suspect's p-value is
    Bonferroni-adjusted, min(1, N x its own), for picking the best of the N keys.
    Exit status 0 when traced (adjusted p < alpha), 1 when not."""
    from fedfm.ip import client_key, trace_keys

    master = key is not None or key_env is not None
    if bool(keys) == master or master != (clients is not None):
        console.print("[red]error:[/] give either --keys K0 --keys K1 ... or --key MASTER (or --key-env VAR) --clients N")
        raise typer.Exit(2)
    if clients is not None and clients < 1:
        console.print(f"[red]error:[/] --clients {clients}: give the number of clients, 1 or more (client ids 0..N-1)")
        raise typer.Exit(2)
    if keys:
        labelled = dict(enumerate(keys))
    else:
        secret = _secret(key, key_env)
        labelled = {c: client_key(secret, c) for c in range(clients)}
    base, state, spec = _suspect(model, config, trigger_size, trigger_length, continuation, ("client_watermark", "waffle"))
    result = trace_keys(base, state, labelled, spec)
    table = Table(title=f"watermark of each client on {model}")
    for col in ("client", "hits", "accuracy", "p-value"):
        table.add_column(col, justify="right")
    for cid, v in result.verdicts.items():
        table.add_row(str(cid), f"{v.hits}/{v.total}{unit(spec)}", f"{v.accuracy:.4f}", f"{v.p_value:.3g}")
    console.print(table)
    ok = result.verified(alpha)
    console.print(f"suspect: client {result.suspect} (p-value {result.p_value:.3g}, Bonferroni-adjusted over "
                  f"{len(result.verdicts)} keys; its own key's p-value {result.p_raw:.3g}): "
                  + ("[green]traced[/]" if ok else "[yellow]not traced[/], no key is answered better than chance allows")
                  + f" (alpha {alpha:g})")
    raise typer.Exit(0 if ok else 1)


@watermark_app.command("copy")
def watermark_copy(
    run: Annotated[Path, typer.Argument(help="a run directory of a job with the client_watermark step")],
    client: Annotated[int, typer.Option(help="the client whose copy to write")],
    out: Annotated[Path, typer.Option(help="the .safetensors file to write")],
    force: Annotated[bool, typer.Option("--overwrite", "--force", help="overwrite OUT if it exists")] = False,
):
    """Write client N's copy after the run's last round (the global model plus its key's offset)."""
    from safetensors.torch import save_file

    from fedfm.ip.copies import final_copy

    if out.exists() and not force:
        console.print(f"[red]error:[/] {out} exists; pass --overwrite to replace it")
        raise typer.Exit(2)
    try:
        state = final_copy(run, client)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        console.print(f"[red]error:[/] {str(exc).strip(chr(39))}")
        raise typer.Exit(2) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    console.print(f"wrote client {client}'s copy ({len(state)} tensors) to {out}")


if __name__ == "__main__":
    watermark_app()
