"""The terminal timeline `chute show` prints: one line per stage, its attempts on a time axis.

Owns: drawing a run's timeline (chute.observe.report.timeline) in characters: `#` ok, `x`
failed, `~` other. Not here: the summary table above it (chute.cli).
Limits: a stage's shards share its line. Where attempts meet in one column the worse one
shows, so a failed attempt stays visible under its retry; an attempt shorter than a
column still takes one, right of the previous attempt's first.
"""

from __future__ import annotations

import math
from pathlib import Path

from chute.units import format_duration

from .timeline import FAILED_STATES, OK_STATES, Task, build_timeline, read_run

_CHAR_RANK = {" ": 0, "#": 1, "~": 2, "x": 3}  # a failed attempt stays visible under a retry


def _bar_char(state: str) -> str:
    return "#" if state in OK_STATES else "x" if state in FAILED_STATES else "~"


def _task_columns(t: Task, span: float, width: int) -> dict[int, str]:
    """The characters of one task's attempts on the axis. An attempt that would land wholly
    on the previous one's first column is nudged one column right, so a retry stays visible
    even when it was quicker than one column."""
    cols: dict[int, str] = {}
    prev = -1
    for seg in t.segments:
        if span > 0:
            c0 = math.floor(seg.start / span * width)
            c1 = math.ceil(seg.end / span * width)
        else:
            c0 = c1 = 0
        c0 = min(max(c0, prev + 1), width - 1)
        c1 = min(max(c1, c0 + 1), width)
        for c in range(c0, c1):
            cols[c] = _bar_char(seg.state)
        prev = c0
    return cols


def _per_char(seconds: float) -> str:
    return format_duration(seconds) if seconds >= 0.1 else f"{seconds * 1000:.0f}ms"


def text_timeline(run_dir: Path, width: int = 60) -> str:
    """One line per stage: its name, its attempts on a `width`-char time axis (`#` ok, `x`
    failed, `~` other), its duration. Empty when no stage is known yet."""
    run, stages = read_run(run_dir)
    if not stages:
        return ""
    tl = build_timeline(run, stages)
    span = tl.span
    name_w = min(max(len(s["name"]) for s in stages), 32)
    lines = [
        f"timeline: {format_duration(span)} from the first start, one char "
        f"{_per_char(span / width)}; # ok, x failed, ~ other"
    ]
    for s in stages:
        bar = [" "] * width
        rows = [t for t in tl.tasks if t.stage == s["name"]]
        for t in rows:
            if t.sharded:
                continue  # its shards' rows carry the work
            for c, ch in _task_columns(t, span, width).items():
                if _CHAR_RANK[ch] > _CHAR_RANK[bar[c]]:
                    bar[c] = ch
        name = s["name"] if len(s["name"]) <= name_w else s["name"][: name_w - 1] + "…"
        if rows and rows[0].reused:
            dur = "reused"
        elif s["duration_seconds"] is None:
            dur = "-"
        else:
            dur = format_duration(s["duration_seconds"])
        lines.append(f"{name:<{name_w}} |{''.join(bar)}| {dur}")
    return "\n".join(lines)
