"""PNG plots of one or several runs, overlaid (matplotlib, Agg backend: no display needed).

- ``accuracy.png`` and ``loss.png``: the evaluation metric per round (train loss dashed);
- ``bytes_accuracy.png``: accuracy against cumulative bytes on the wire (up + down);
- ``participation.png``: per run, a clients x rounds grid: aggregated, dropped (dropout or
  deadline), failed (exception), rejected (validation), or not sampled.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedfm.report.runs import Run  # noqa: E402

STATUS = ["not sampled", "aggregated", "dropped", "failed", "rejected"]
COLORS = ["#f0f0f0", "#2b8a3e", "#f59f00", "#c92a2a", "#7048e8"]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_plot(runs: list[Run], key: str, path: Path, train_key: str | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        x, y = run.series(key)
        ax.plot(x, y, marker="o", color=color, label=run.label)
        if train_key:
            tx, ty = run.series(train_key)
            if tx:
                ax.plot(tx, ty, linestyle="--", marker=".", color=color, label=f"{run.label} (train)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bytes_plot(runs: list[Run], path: Path, key: str = "accuracy") -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, run in enumerate(runs):
        cum = run.cumulative_bytes()
        pts = [(b / 1e6, float(r[key])) for b, r in zip(cum, run.rows) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=f"C{i % 10}", label=run.label)
    ax.set_xlabel("cumulative MB on the wire (up + down)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def participation_grid(run: Run) -> np.ndarray:
    """(clients, rounds) status codes, indices into ``STATUS``; round 0 is left out."""
    rounds = [r for r in run.rows if r["round"] > 0]
    grid = np.zeros((max(run.num_clients, 1), max(len(rounds), 1)), dtype=int)  # (C, R)
    for j, r in enumerate(rounds):
        for code, key in ((2, "dropped"), (3, "failed"), (4, "rejected")):
            for e in r.get(key, []):
                grid[e["cid"], j] = code
        for cid in r.get("clients", []):
            grid[cid, j] = 1
    return grid


def participation_plot(runs: list[Run], path: Path) -> Path:
    fig, axes = plt.subplots(len(runs), 1, figsize=(6.4, 1.2 + 2.2 * len(runs)), squeeze=False)
    cmap = ListedColormap(COLORS)
    for ax, run in zip(axes[:, 0], runs):
        grid = participation_grid(run)  # (C, R)
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=len(COLORS) - 1, aspect="auto", interpolation="nearest",
                  extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] - 0.5, -0.5))
        ax.set_title(run.label, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("client")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Patch(color=c, label=s) for c, s in zip(COLORS, STATUS)]
    fig.legend(handles=handles, loc="lower center", ncol=len(STATUS), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = ("accuracy", "loss", "bytes_accuracy", "participation")  # each written as <name>.png


def write_plots(runs: list[Run], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = {name: out / f"{name}.png" for name in PLOTS}
    return {
        "accuracy": metric_plot(runs, "accuracy", path["accuracy"]),
        "loss": metric_plot(runs, "loss", path["loss"], train_key="train_loss"),
        "bytes_accuracy": bytes_plot(runs, path["bytes_accuracy"]),
        "participation": participation_plot(runs, path["participation"]),
    }
