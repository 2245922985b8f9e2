"""report.html: one self-contained page per run, drawn from the run's timeline.

Owns: `<run_dir>/report.html` (derived data: rebuilt from run.json and manifest.json through
chute.observe.report.timeline, which only reads them) and the page: the run's facts, its
critical path, the legend, the charts in their places, the execution summary. Not here:
the model (chute.observe.report.timeline), the charts (chute.observe.report.charts), the
page's colours, CSS and script (chute.observe.report.assets), when a page is written
(chute.cli's foreground runs, chute.daemon.upkeep).
Crash safety: the page is replaced atomically (`chute.store.atomic.write_volatile`, no
fsync), so a reader sees the old page or the new one; losing it loses nothing,
`write_report` rebuilds it.
Diagnostics: a page that cannot be built would be a chute bug: `write_report_or_log` logs
it with a traceback; one whose files cannot be read or written (a run folder a task broke,
the disk) is one WARNING line. The run's outcome never depends on it.
Limits: the page fetches nothing (inline CSS, SVG and JS; no URL anywhere) and escapes
every string from the spec or the run (chute.observe.report.markup).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chute.scheduling.topology import format_cpulist
from chute.store import atomic
from chute.units import format_duration

from . import assets
from .charts import core_chart, stage_chart
from .markup import dur, esc
from .timeline import OK_STATES, Timeline, build_timeline, read_run

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"


def _facts(run: dict[str, Any]) -> str:
    trig = run.get("trigger") or {}
    trigger = " ".join(
        str(v) for v in (trig.get("type"), trig.get("source"), trig.get("fire_time")) if v
    )
    who = run.get("submitted_by") or {}
    pairs = [
        ("pipeline", f"{run.get('pipeline', '-')} ({run.get('kind', '-')})"),
        ("trigger", trigger or "-"),
        ("created", run.get("created_at") or "-"),
        ("started", run.get("started_at") or "-"),
        ("finished", run.get("finished_at") or "-"),
        ("duration", dur(run.get("duration_seconds"))),
        ("resumed from", run.get("resumed_from") or "-"),
        ("host", run.get("host") or "-"),
        ("submitted by", f"{who.get('user') or '-'} (uid {who.get('uid', '-')})"),
        ("recoveries", str(run.get("recoveries", 0))),
    ]
    cells = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs)
    return f'<dl class="facts">{cells}</dl>'


def _legend() -> str:
    items = [
        f'<span><i class="sw s-{k}"></i>{k.replace("_", " ")}</span>'
        for k in assets.COLOURS
        if k not in ("pending", "waiting")
    ]
    items.append('<span><i class="sw s-pending"></i>pending / waiting</span>')
    items.append('<span><i class="sw critsw"></i>critical path</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def _summary_table(tl: Timeline) -> str:
    crit = set(tl.critical)
    head = "".join(
        f"<th>{h}</th>"
        for h in ("stage", "state", "attempts", "start", "duration", "cores", "error")
    )
    rows = [f"<tr>{head}</tr>"]
    for t in tl.tasks:
        # A stage that ended ok shows no error; its retries are in the attempts column.
        errors = [] if t.state in OK_STATES else [g.error for g in t.segments if g.error]
        name = t.stage if t.shard is None else f"[{t.shard}]"
        mark = " ◆" if t.shard is None and t.stage in crit else ""
        start = "-" if t.start is None or t.reused else f"+{format_duration(t.start)}"
        cells = [
            f"{esc(name)}{mark}",
            f'<i class="dot s-{esc(t.state)}"></i>{esc(t.state)}'
            + (" (reused)" if t.reused else ""),
            "-" if t.sharded else str(t.attempts),
            start,
            dur(t.duration),
            esc(format_cpulist(t.cores) or "-"),
            esc(errors[-1]) if errors else "",
        ]
        classes = ["", "", "num", "num", "num", "cores", "err"]
        tds = "".join(
            f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>"
            for c, v in zip(classes, cells, strict=True)
        )
        rows.append(f'<tr class="{"shard" if t.shard is not None else "stage"}">{tds}</tr>')
    return f'<table class="summary">{"".join(rows)}</table>'


def render(run: dict[str, Any], stages: Sequence[dict[str, Any]]) -> str:
    """The report page of a run (pure: the two files' contents in, HTML out)."""
    tl = build_timeline(run, stages)
    state = str(run.get("state", "-"))
    run_id = str(run.get("run_id", "-"))
    badge = assets.RUN_STATE_CLASS.get(state, "pending")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>chute run {esc(run_id)} · {esc(run.get('pipeline', '-'))} · {esc(state)}</title>",
        f"<style>{assets.CSS}\n{assets.state_css()}</style></head>",
        '<body data-ready="0">',
        assets.HATCH,
        '<div id="tip" hidden></div>',
        f'<h1>chute run <span class="mono">{esc(run_id)}</span>'
        f' <span class="badge s-{badge}">{esc(state)}</span></h1>',
        _facts(run),
    ]
    if run.get("error"):
        parts.append(f'<div class="error">error: {esc(run["error"])}</div>')
    if tl.critical:
        last = next(t for t in tl.tasks if t.stage == tl.critical[-1] and t.shard is None)
        chain = " → ".join(f"<b>{esc(n)}</b>" for n in tl.critical)
        parts.append(
            f'<p class="critline" id="critical-path">critical path: {chain}'
            f" (ends at +{dur(last.end)} of {dur(tl.span)})</p>"
        )
    parts.append(
        '<nav><a href="#by-stage">timeline by stage</a><a href="#by-core">by core</a>'
        '<a href="#summary">summary</a></nav>'
    )
    parts.append(_legend())
    parts.append('<h2 id="by-stage">Timeline by stage</h2>')
    if stages:
        parts.append(f'<div class="scroll">{stage_chart(tl, state)}</div>')
        parts.append('<h2 id="by-core">Stages and shards on their cores</h2>')
        parts.append(f'<div class="scroll">{core_chart(tl, state)}</div>')
        parts.append('<h2 id="summary">Execution summary</h2>')
        parts.append(_summary_table(tl))
    else:
        parts.append(
            f'<p class="empty">No stage is known yet: the run is {esc(state)} and has no'
            " manifest.</p>"
        )
        parts.append('<h2 id="by-core">Stages and shards on their cores</h2>')
        parts.append('<p class="empty">No task has run on a core in this run.</p>')
        parts.append('<h2 id="summary">Execution summary</h2><p class="empty">-</p>')
    parts.append(f"<script>{assets.JS}</script></body></html>\n")
    return "\n".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report.html` from the run's run.json and manifest.json."""
    run, stages = read_run(run_dir)
    path = run_dir / REPORT_NAME
    # Completes the handover "run ended -> its report exists": a reader sees the old page
    # or the new one, never half of one.
    # Derived from run.json and manifest.json, rebuilt by any call: atomic, no fsync.
    atomic.write_volatile(path, render(run, stages).encode())
    return path


def write_report_or_log(run_dir: Path) -> Path | None:
    """`write_report`, for callers whose outcome must not depend on it (the run has ended
    either way): a failure gives None, logged as one line when it is the run folder's (a
    task may have removed or replaced anything there), else with its traceback."""
    try:
        return write_report(run_dir)
    except OSError as exc:
        log.warning(
            "%s report: could not write %s: %s: %s",
            run_dir.name,
            run_dir / REPORT_NAME,
            exc.filename,
            exc.strerror,
        )
        return None
    except Exception:
        log.exception("%s report: could not write %s", run_dir.name, run_dir / REPORT_NAME)
        return None
