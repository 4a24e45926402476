"""``fedfm report DIR [DIR ...]``: the plots and one self-contained report.html.

The HTML page embeds every plot as base64 PNG and shows, per run, a summary row (final
accuracy and loss, bytes on the wire, rounds skipped, clients dropped / failed / rejected,
wall time, peak RSS) and its config, so it can be mailed or archived on its own. Wall
times are written as everywhere else in fedfm (``format_duration``: ``8.2 s``,
``2 min 49 s``, ``1 h 02 min``); a resumed run shows its total and its number of parts.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import yaml

from fedfm.report.plots import PLOTS, write_plots
from fedfm.runtime.progress import format_duration
from fedfm.report.runs import Run, load_run, unique_labels

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td:first-child{text-align:left}pre{background:#f8f8f8;padding:1em;overflow:auto}
img{max-width:100%}figure{display:inline-block;margin:.5em}"""

COLUMNS = ["run", "rounds", "final accuracy", "final loss", "MB up", "MB down", "skipped rounds",
           "dropped", "failed", "rejected", "wall", "peak RSS MB"]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def summary_row(run: Run) -> list[Any]:
    rows = run.rows
    evaluated = [r for r in rows if r.get("loss") is not None]
    last = evaluated[-1] if evaluated else {}
    count = lambda key: sum(len(r.get(key, [])) for r in rows)  # noqa: E731
    return [
        run.label,
        max(r["round"] for r in rows),
        last.get("accuracy"),
        last.get("loss"),
        sum(r.get("bytes_up", 0) for r in rows) / 1e6,
        sum(r.get("bytes_down", 0) for r in rows) / 1e6,
        sum(1 for r in rows if r.get("skipped")),
        count("dropped"),
        count("failed"),
        count("rejected"),
        wall_time(run.summary),
        None if run.summary.get("peak_rss_mb") is None else f"{run.summary['peak_rss_mb']:,.0f}",
    ]


def wall_time(summary: dict[str, Any]) -> str:
    """The run's wall time; for a resumed run, the total over its parts and their number."""
    parts = summary.get("parts") or []
    text = format_duration(summary.get("wall_s"))
    return f"{text} ({len(parts)} parts)" if len(parts) > 1 else text


def _img(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(title)}</figcaption></figure>'


def render_html(runs: list[Run], plots: dict[str, Path]) -> str:
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in summary_row(r)) + "</tr>" for r in runs)
    figures = "".join(_img(p, name.replace("_", " ")) for name, p in plots.items())
    configs = "".join(
        f"<h3>{html.escape(r.label)}</h3><p>{html.escape(str(r.dir))}</p>"
        f"<pre>{html.escape(yaml.safe_dump(r.config, sort_keys=False))}</pre>"
        for r in runs
    )
    title = "fedfm report: " + ", ".join(r.label for r in runs)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<h2>Summary</h2><table><tr>{head}</tr>{body}</table>"
        f"<h2>Plots</h2>{figures}<h2>Configs</h2>{configs}</body></html>"
    )


PAGE = "report.html"
WRITES = (PAGE, *(f"{name}.png" for name in PLOTS))


def out_problem(out: Path) -> str | None:
    """Why the report may not be written into ``out``: a file there, or a file of a name the
    report writes that an earlier fedfm report did not write (its report.html says so); the
    report replaces only its own earlier files and leaves every other file as it is."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: a file, not a folder"
    taken = [n for n in WRITES if (out / n).exists()]
    if not taken:
        return None
    page = out / PAGE
    if page.is_file() and page.read_text(errors="replace")[:200].find("<title>fedfm report: ") >= 0:
        return None
    return (f"--out {out} holds {', '.join(taken)}, which this report would overwrite and no fedfm report wrote; "
            "pick another folder")


def build_report(dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the PNGs and report.html for ``dirs`` (overlaid) into ``out``; returns the HTML path."""
    if not dirs:
        raise ValueError("give at least one run directory")
    runs = [load_run(d) for d in dirs]
    unique_labels(runs)
    out = Path(out) if out is not None else (Path(dirs[0]) / "report" if len(dirs) == 1 else Path("report"))
    problem = out_problem(out)
    if problem is not None:
        raise ValueError(problem)
    plots = write_plots(runs, out)
    page = out / PAGE
    page.write_text(render_html(runs, plots))
    return page
