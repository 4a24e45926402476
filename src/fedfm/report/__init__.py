"""Reports: metrics files of one or several runs -> PNG plots and a self-contained HTML page."""

from fedfm.report.build import build_report
from fedfm.report.runs import Run, load_run

__all__ = ["Run", "build_report", "load_run"]
