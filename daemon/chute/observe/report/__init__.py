"""The run report: report.html per run, and the terminal timeline, drawn from one model.

The package, by concept: `timeline` (run.json and manifest.json as rows of attempts on one
time axis, and the critical path), `html` (report.html), `assets` (the page's colours, CSS
and script), `text` (the timeline `chute show` prints). Callers use what is named here.
"""

from .html import REPORT_NAME, write_report, write_report_or_log
from .text import text_timeline

__all__ = ["REPORT_NAME", "text_timeline", "write_report", "write_report_or_log"]
