"""Rich progress bars (round, client, step), a line per round and an ETA.

Every finished round prints one line: its metrics, clients, bytes, wall time and, once a
training round has finished, the estimated time left (the mean wall time of this part's
rounds times the rounds still to run). Round 0, the evaluation of the initial model, is
printed the same way when the loop hands it over (``begin``). Durations are written by
``format_duration`` here and in the reports alike.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def format_duration(seconds: float | None) -> str:
    """``8.2 s``, ``2 min 49 s``, ``1 h 02 min``: one format for every wall time shown."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def round_line(rnd: int, row: dict) -> str:
    """The one-line account of a round (round 0: the initial model's evaluation)."""
    shown = "  ".join(f"{k} {row[k]:.4f}" for k in ("accuracy", "loss", "perplexity") if row.get(k) is not None)
    if rnd == 0:
        return f"[bold]round   0[/]  {shown}  (initial model, before training)  {format_duration(row.get('wall_s'))}"
    faults = "  ".join(
        f"{k} {len(row[k])}" for k in ("dropped", "failed", "rejected") if row.get(k)
    ) + (f"  attempts {row['attempts']}" if row.get("attempts", 1) > 1 else "")
    faults += "  [yellow]skipped[/]" if row.get("skipped") else ""
    return (
        f"[bold]round {rnd:>3}[/]  {shown}  clients {len(row.get('clients', []))}  {faults + '  ' if faults else ''}"
        f"up {row.get('bytes_up', 0):,} B  down {row.get('bytes_down', 0):,} B  {format_duration(row.get('wall_s'))}"
    )


class RunProgress:
    def __init__(self, rounds: int, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self._p: Progress | None = None
        self.rounds = rounds
        self._walls: list[float] = []  # wall time of the training rounds finished in this part

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

    def begin(self, rows: list[dict]) -> None:
        """Called once before the first round with the rows logged so far: a fresh run's
        round 0 is printed at once; a resumed run's bar starts at its last round."""
        if not rows:
            return
        last = rows[-1]
        if self._p is not None:
            self._p.update(self.t_round, completed=last["round"])
        if last["round"] == 0:
            self.console.print(round_line(0, last))

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

    def eta(self, rnd: int) -> float | None:
        """Seconds left after round ``rnd``: this part's mean round time x rounds to go."""
        left = self.rounds - rnd
        if left <= 0 or not self._walls:
            return None
        return sum(self._walls) / len(self._walls) * left

    def end_round(self, rnd: int, row: dict) -> None:
        if self._p is not None:
            self._p.update(self.t_round, completed=rnd)
        if rnd == 0:
            self.console.print(round_line(0, row))
            return
        if row.get("wall_s") is not None:
            self._walls.append(float(row["wall_s"]))
        eta = self.eta(rnd)
        tail = f"  ETA {format_duration(eta)} ({self.rounds - rnd} round{'s' if self.rounds - rnd > 1 else ''} left)" if eta else ""
        self.console.print(round_line(rnd, row) + tail)
