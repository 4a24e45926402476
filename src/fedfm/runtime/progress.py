"""Rich progress bars (round, client, step) and a per-round summary line."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    def __init__(self, rounds: int, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self._p: Progress | None = None
        self.rounds = rounds

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self._p = Progress(
                TextColumn("{task.description:>8}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._p.__enter__()
            self.t_round = self._p.add_task("round", total=self.rounds)
            self.t_client = self._p.add_task("client", total=1)
            self.t_step = self._p.add_task("step", total=1)
        return self

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def start_round(self, rnd: int, n_clients: int) -> None:
        if self._p is not None:
            self._p.update(self.t_round, completed=rnd - 1, description=f"round {rnd}")
            self._p.reset(self.t_client, total=n_clients)

    def start_client(self, cid: int) -> None:
        if self._p is not None:
            self._p.update(self.t_client, description=f"client {cid}")
            self._p.reset(self.t_step, total=1)

    def step(self, step: int, total: int) -> None:
        if self._p is not None:
            self._p.update(self.t_step, completed=step, total=total)

    def end_client(self) -> None:
        if self._p is not None:
            self._p.advance(self.t_client)

    def end_round(self, rnd: int, row: dict) -> None:
        if self._p is not None:
            self._p.update(self.t_round, completed=rnd)
        shown = "  ".join(f"{k} {row[k]:.4f}" for k in ("accuracy", "loss", "perplexity") if row.get(k) is not None)
        faults = "  ".join(
            f"{k} {len(row[k])}" for k in ("dropped", "failed", "rejected") if row.get(k)
        ) + (f"  attempts {row['attempts']}" if row.get("attempts", 1) > 1 else "")
        faults += "  [yellow]skipped[/]" if row.get("skipped") else ""
        self.console.print(
            f"[bold]round {rnd:>3}[/]  {shown}  clients {len(row['clients'])}  {faults + '  ' if faults else ''}"
            f"up {row['bytes_up']:,} B  down {row['bytes_down']:,} B  {row['wall_s']:.1f}s"
        )
