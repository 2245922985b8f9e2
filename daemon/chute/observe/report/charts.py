"""The SVG charts of report.html: a run's timeline by stage, and by core.

Owns: drawing a timeline (chute.observe.report.timeline) as bars on a time axis: a row per
stage and shard (the critical path outlined), or a row per core with the attempts that ran
on it; each bar's tooltip. Not here: the page around them (chute.observe.report.html).
Limits: a zero-length attempt is drawn MIN_BAR_W wide; a stage that never started is a
stub where it was decided; a reused stage is a stub at the start, not on the old run's
clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from chute.scheduling.topology import format_cpulist
from chute.units import format_duration

from .markup import attr, clip, dur, esc, num
from .timeline import Segment, Task, Timeline

ROW_H = 22  # px per timeline row
BAR_H = 14
AXIS_H = 30
CHART_W = 960  # px for the time axis
TAIL_W = 150  # room after the last bar for its duration and state
CHAR_W = 7  # px per label character (12px system font, generous)
MIN_BAR_W = 2.0  # a zero-length attempt (a cache hit, a 0 s run) stays visible
IDLE_BAR_W = 28.0  # a stage that never started: a hatched stub where it was decided


def _tick_step(span: float, target: int = 8) -> float:
    raw = span / target
    steps = [m * 10.0**k for k in range(-3, 2) for m in (1, 2, 5)]
    steps += [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400]
    for step in steps:
        if step >= raw:
            return float(step)
    return 86400.0 * math.ceil(raw / 86400)


def _tick_label(t: float) -> str:
    if t == 0:
        return "0"
    if t < 60:
        return f"{round(t, 3):g}s"
    if t < 3600:
        m, s = divmod(round(t), 60)
        return f"{m}m{s:02d}s" if s else f"{m}m"
    h, rest = divmod(round(t), 3600)
    return f"{h}h{rest // 60:02d}m" if rest else f"{h}h"


def _tip(task: Task, seg: Segment | None, run_state: str) -> str:
    head = f"stage {task.stage}" + ("" if task.shard is None else f" shard {task.shard}")
    lines = [head]
    if seg is None:
        lines.append(f"state {task.state}")
        if task.reused:
            lines.append("reused from the run it was retried from (its times are that run's)")
        elif task.state == "skipped":
            lines.append("never started: a dependency failed")
        else:
            lines.append(f"never started (run {run_state})")
    else:
        state = seg.state if seg.state == task.state else f"{seg.state} (stage {task.state})"
        lines.append(f"state {state}")
        if seg.fallback:
            lines.append(f"fallback after attempt {seg.attempts}")
        elif seg.attempt is not None:
            lines.append(f"attempt {seg.attempt} of {seg.attempts}")
        lines.append(
            f"start +{format_duration(seg.start)}  duration {format_duration(seg.end - seg.start)}"
        )
        if seg.exit_code is not None or seg.signal is not None:
            code = "-" if seg.exit_code is None else str(seg.exit_code)
            sig = "-" if seg.signal is None else str(seg.signal)
            lines.append(f"exit code {code}  signal {sig}")
        if seg.error:
            lines.append(f"error {seg.error}")
    cores = task.cores if seg is None else seg.cores
    lines.append(f"cores {format_cpulist(cores) or '-'}")
    return "\n".join(lines)


class _Chart:
    """One SVG chart: a labelled row per task or core under a time axis of `span` seconds.
    Stripes lie under the grid, the grid under the bars."""

    def __init__(self, span: float, labels: Sequence[str], name: str) -> None:
        self.span = span
        self.label_w = max(70, min(16 + CHAR_W * max((len(s) for s in labels), default=4), 260))
        self.left = float(self.label_w)  # where the time axis starts
        self.width = self.label_w + CHART_W + TAIL_W
        self.height = AXIS_H + len(labels) * ROW_H + 6
        self._stripes = [
            f'<svg class="chart" width="{self.width}" height="{self.height}"'
            f' viewBox="0 0 {self.width} {self.height}" role="img" aria-label="{esc(name)}">'
        ]
        self.out: list[str] = []

    def x(self, t: float) -> float:
        if self.span <= 0:
            return self.left
        return self.left + max(0.0, min(t, self.span)) / self.span * CHART_W

    def row(self, i: int, label: str, classes: str = "label") -> tuple[int, float]:
        """Row `i`'s stripe and its label (markup, escaped by the caller): the row's top
        and its bars' top."""
        y = AXIS_H + i * ROW_H
        self._stripes.append(
            f'<rect class="row{" alt" if i % 2 else ""}" x="0" y="{y}"'
            f' width="{self.width}" height="{ROW_H}"/>'
        )
        self.out.append(
            f'<text class="{classes}" x="{self.label_w - 8}" y="{y + ROW_H / 2 + 4:.1f}"'
            f' text-anchor="end">{label}</text>'
        )
        return y, y + (ROW_H - BAR_H) / 2

    def svg(self) -> str:
        return "\n".join([*self._stripes, *self._axis(), *self.out, "</svg>"])

    def _axis(self) -> list[str]:
        out: list[str] = []
        span = self.span
        step = _tick_step(span) if span > 0 else 1.0
        n = int(span / step + 1e-9) if span > 0 else 0
        top, bottom = AXIS_H - 6, self.height - 4
        for i in range(n + 1):
            t = i * step
            x = num(self.x(t))
            out.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{top}" y2="{bottom}"/>')
            out.append(f'<text class="axis" x="{x}" y="{AXIS_H - 10}" text-anchor="middle">')
            out.append(f"{esc(_tick_label(t))}</text>")
        if span > 0 and span - n * step > step * 0.25:
            x = num(self.x(span))
            out.append(f'<line class="endline" x1="{x}" x2="{x}" y1="{top}" y2="{bottom}"/>')
        return out


def _seg_rect(x0: float, x1: float, y: float, h: float, classes: str, tip: str, state: str) -> str:
    w = max(x1 - x0, MIN_BAR_W)
    return (
        f'<rect class="seg s-{esc(state)} {classes}" x="{num(x0)}" y="{num(y)}"'
        f' width="{num(w)}" height="{num(h)}" data-tip="{attr(tip)}">'
        f"<title>{esc(tip)}</title></rect>"
    )


def stage_chart(tl: Timeline, run_state: str) -> str:
    labels = [t.stage if t.shard is None else f"[{t.shard}]" for t in tl.tasks]
    chart = _Chart(tl.span, labels, "timeline by stage")
    chars = (chart.label_w - 16) // CHAR_W
    crit = set(tl.critical)
    out = chart.out
    for i, (t, label) in enumerate(zip(tl.tasks, labels, strict=True)):
        on_path = t.stage in crit
        cls = "label" + (" shard" if t.shard is not None else "") + (" crit" if on_path else "")
        y, by = chart.row(i, f"{esc(clip(label, chars))}<title>{esc(t.name)}</title>", classes=cls)
        crit_cls = "crit" if on_path else ""
        end_x = chart.left
        if t.reused:
            tip = _tip(t, None, run_state)
            out.append(
                _seg_rect(chart.left, chart.left + IDLE_BAR_W, by, BAR_H, "reused", tip, t.state)
            )
            end_x = chart.left + IDLE_BAR_W
            tail = "reused"
        elif t.sharded or t.segments:
            # A sharded stage's segments are its envelope: thin, above its shards' rows.
            bar_y, bar_h = (by + BAR_H / 2 - 3, 6) if t.sharded else (by, BAR_H)
            classes = f"envelope {crit_cls}" if t.sharded else crit_cls
            for seg in t.segments:
                x0, x1 = chart.x(seg.start), chart.x(seg.end)
                tip = _tip(t, seg, run_state)
                out.append(_seg_rect(x0, x1, bar_y, bar_h, classes, tip, seg.state))
                end_x = max(end_x, x0 + max(x1 - x0, MIN_BAR_W))
            tail = dur(t.duration) + ("" if t.state == "succeeded" else f" · {t.state}")
        else:
            decided = t.end if t.end is not None else 0.0
            x0 = chart.x(decided)
            x1 = max(chart.x(tl.span), x0 + IDLE_BAR_W)
            out.append(_seg_rect(x0, x1, by, BAR_H, "idle", _tip(t, None, run_state), t.state))
            end_x = x1
            tail = t.state
        out.append(
            f'<text class="tail" x="{num(end_x + 5)}" y="{y + ROW_H / 2 + 4:.1f}">'
            f"{esc(tail)}</text>"
        )
    return chart.svg()


def core_chart(tl: Timeline, run_state: str) -> str:
    workers = [t for t in tl.tasks if not t.sharded and t.segments]
    cores = sorted({c for t in workers for seg in t.segments for c in seg.cores})
    if not cores:
        return '<p class="empty">No task has run on a core in this run.</p>'
    labels = [f"cpu {c}" for c in cores]
    chart = _Chart(tl.span, labels, "timeline by core")
    crit = set(tl.critical)
    for i, (core, label) in enumerate(zip(cores, labels, strict=True)):
        y, by = chart.row(i, esc(label))
        for t in workers:
            crit_cls = "crit" if t.stage in crit else ""
            for seg in t.segments:
                if core not in seg.cores:
                    continue
                x0, x1 = chart.x(seg.start), chart.x(seg.end)
                chart.out.append(
                    _seg_rect(x0, x1, by, BAR_H, crit_cls, _tip(t, seg, run_state), seg.state)
                )
                room = int((x1 - x0 - 6) / 6.5)
                if room >= 3 and seg.state != "skipped":
                    chart.out.append(
                        f'<text class="inbar" x="{num(x0 + 3)}" y="{y + ROW_H / 2 + 4:.1f}">'
                        f"{esc(clip(t.name, room))}</text>"
                    )
    return chart.svg()
