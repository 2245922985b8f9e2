"""The run report: one self-contained `report.html` per run, and the terminal timeline.

Owns: `<run_dir>/report.html` (derived data: rebuilt from run.json and manifest.json, which
it only reads; chute.store.rundir and chute.engine own those). Not here: the summary table text
(chute.cli), when a report is written (chute.cli `_foreground`, chute.daemon).
Crash safety: the page is replaced atomically (`chute.store.atomic.write_volatile`, no fsync), so
a reader sees the old page or the new one; losing it loses nothing, `write_report` rebuilds
it.
Diagnostics: a page that cannot be built would be a chute bug: `write_report_or_log` logs
it with a traceback; one whose files cannot be read or written (a run folder a task broke,
the disk) is one WARNING line. The run's outcome never depends on it.
Limits: the page fetches nothing (inline CSS, SVG and JS; no URL anywhere) and escapes every
string from the spec or the run. Each attempt is drawn on the cores it ran on (an older
manifest's attempts, which do not say, on their task's); an attempt with no finish yet ends
at the latest time the files know. Attempts the manifest leaves out (a task's beyond its
first and last three) are not drawn; the counts include them. Stages a `chute retry` reused
kept the old run's times: they are drawn as "reused" at the start, not on the old run's
clock, and never join the critical path.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from chute.clock import parse_rfc3339
from chute.scheduling.topology import format_cpulist
from chute.store import atomic, rundir
from chute.units import format_duration

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"

# Bar colours by state; tests look for the succeeded and failed ones in a screenshot.
COLOURS: dict[str, str] = {
    "succeeded": "#2e9d4a",
    "failed": "#d62d2d",
    "timed_out": "#f08c00",
    "cancelled": "#8a8f98",
    "skipped": "#d3d6db",
    "cached": "#12a3a3",
    "fallback": "#8e44ad",
    "running": "#2f6fdb",
    "pending": "#b8c4d6",
    "waiting": "#b8c4d6",
}
OK_STATES = frozenset({"succeeded", "cached"})
FAILED_STATES = frozenset({"failed", "timed_out"})


@dataclass(frozen=True, slots=True)
class Segment:
    """One stretch of a row: an attempt, or the whole task when it has no attempts."""

    start: float  # seconds from the run's first start
    end: float
    state: str
    attempt: int | None
    attempts: int
    fallback: bool
    exit_code: int | None
    signal: int | None
    error: str | None
    cores: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Task:
    """One row of the timeline: a stage, or one shard of a sharded stage."""

    stage: str
    shard: int | None
    sharded: bool  # a stage row whose work is in its shard rows
    state: str
    cores: tuple[int, ...]
    start: float | None
    end: float | None
    duration: float | None
    attempts: int
    reused: bool
    depends_on: tuple[str, ...]
    segments: tuple[Segment, ...]

    @property
    def name(self) -> str:
        return self.stage if self.shard is None else f"{self.stage}[{self.shard}]"


@dataclass(frozen=True, slots=True)
class Timeline:
    span: float  # seconds from the first start to the last known time, >= 0
    tasks: tuple[Task, ...]
    critical: tuple[str, ...]  # stage names, first to last


# -- the model: run.json + manifest.json -> rows of segments ---------------------------------


def _ts(text: str | None) -> datetime | None:
    return None if text is None else parse_rfc3339(text)


def _attempt_state(a: dict[str, Any], task_state: str) -> str:
    error = a.get("error")
    if a.get("finished_at") is None:
        return "running" if task_state in ("running", "pending", "waiting") else task_state
    if error is None and a.get("signal") is None and a.get("exit_code") in (0, None):
        return "fallback" if a.get("fallback") else "succeeded"
    if str(error).startswith("timed out"):
        return "timed_out"
    if str(error).startswith("cancelled"):
        return "cancelled"
    return "failed"


def build_timeline(run: dict[str, Any], stages: Sequence[dict[str, Any]]) -> Timeline:
    """Rows and critical path of a run, times in seconds from its first start (pure)."""
    entries = list(stages) + [sh for s in stages for sh in s["shards"]]
    t0 = _ts(run.get("started_at"))
    if t0 is None:
        starts = [_ts(e["started_at"]) for e in entries if e.get("started_at")]
        t0 = min((s for s in starts if s is not None), default=None)
    if t0 is None:
        t0 = _ts(run.get("created_at"))

    def rel(text: str | None) -> float | None:
        when = _ts(text)
        if when is None or t0 is None:
            return None
        return (when - t0).total_seconds()

    known = [rel(run.get("finished_at"))]
    for e in entries:
        known.append(rel(e.get("finished_at")))
        known.append(rel(e.get("started_at")))
        known.extend(rel(a.get("finished_at")) for a in e["attempts"])
    span = max([k for k in known if k is not None] + [0.0])

    def task(
        e: dict[str, Any], stage: str, shard: int | None, sharded: bool, deps: list[str]
    ) -> Task:
        start, end = rel(e.get("started_at")), rel(e.get("finished_at"))
        reused = start is not None and start < 0
        segs: list[Segment] = []
        # The manifest lists a task's first and last few attempts; the count is of all.
        total = int(e.get("attempts_total", len(e["attempts"])))
        tries = total - sum(1 for a in e["attempts"] if a.get("fallback"))
        if not reused:
            for a in e["attempts"]:
                a_start = rel(a["started_at"]) or 0.0
                a_end = rel(a.get("finished_at"))
                segs.append(
                    Segment(
                        start=a_start,
                        end=span if a_end is None else a_end,
                        state=_attempt_state(a, e["state"]),
                        attempt=a["attempt"],
                        attempts=tries,
                        fallback=bool(a.get("fallback")),
                        exit_code=a.get("exit_code"),
                        signal=a.get("signal"),
                        error=a.get("error"),
                        cores=tuple(a.get("cores", e["cores"])),
                    )
                )
            if not segs and start is not None:
                segs.append(
                    Segment(
                        start=start,
                        end=span if end is None else end,
                        state=e["state"],
                        attempt=None,
                        attempts=0,
                        fallback=False,
                        exit_code=None,
                        signal=None,
                        error=None,
                        cores=tuple(e["cores"]),
                    )
                )
        return Task(
            stage=stage,
            shard=shard,
            sharded=sharded,
            state=e["state"],
            cores=tuple(e["cores"]),
            start=start,
            end=end,
            duration=e.get("duration_seconds"),
            attempts=total,
            reused=reused,
            depends_on=tuple(deps),
            segments=tuple(segs),
        )

    tasks: list[Task] = []
    for s in stages:
        deps = s["dependsOn"]
        tasks.append(task(s, s["name"], None, bool(s["shards"]), deps))
        tasks.extend(task(sh, s["name"], sh["index"], False, deps) for sh in s["shards"])
    return Timeline(span=span, tasks=tuple(tasks), critical=_critical_path(tasks))


def _critical_path(tasks: Sequence[Task]) -> tuple[str, ...]:
    """Walk back from the stage that finished last through the dependency that finished
    latest: the chain whose finish times set the run's end. Ties go to the later stage in
    topological order (the downstream one)."""
    order = {t.stage: i for i, t in enumerate(t for t in tasks if t.shard is None)}
    ran = {
        t.stage: t
        for t in tasks
        if t.shard is None and t.start is not None and t.end is not None and not t.reused
    }
    if not ran:
        return ()

    def latest(names: Iterable[str]) -> str | None:
        cands = [n for n in names if n in ran]
        if not cands:
            return None
        return max(cands, key=lambda n: (ran[n].end or 0.0, order[n]))

    path: list[str] = []
    cur = latest(ran)
    while cur is not None and cur not in path:
        path.append(cur)
        cur = latest(ran[cur].depends_on)
    return tuple(reversed(path))


def _read(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run: dict[str, Any] = rundir.read_json(run_dir / "run.json")
    try:
        stages: list[dict[str, Any]] = rundir.read_json(run_dir / "manifest.json")["stages"]
    except FileNotFoundError:
        stages = []  # queued: the engine has not written a manifest yet
    return run, stages


# -- the terminal timeline ---------------------------------------------------------------------


def _bar_char(state: str) -> str:
    return "#" if state in OK_STATES else "x" if state in FAILED_STATES else "~"


_CHAR_RANK = {" ": 0, "#": 1, "~": 2, "x": 3}  # a failed attempt stays visible under a retry


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
    run, stages = _read(run_dir)
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


# -- the HTML page -----------------------------------------------------------------------------

ROW_H = 22  # px per timeline row
BAR_H = 14
AXIS_H = 30
CHART_W = 960  # px for the time axis
TAIL_W = 150  # room after the last bar for its duration and state
CHAR_W = 7  # px per label character (12px system font, generous)
MIN_BAR_W = 2.0  # a zero-length attempt (a cache hit, a 0 s run) stays visible
IDLE_BAR_W = 28.0  # a stage that never started: a hatched stub where it was decided

RUN_STATE_CLASS = {
    "queued": "pending",
    "running": "running",
    "stopped": "pending",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "interrupted": "timed_out",
}

_HATCH = (
    '<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
    '<pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse"'
    ' patternTransform="rotate(45)"><rect width="6" height="6" fill="#eef0f2"/>'
    '<rect width="3" height="6" fill="#c9cdd3"/></pattern></defs></svg>'
)

_CSS = """
body{margin:0;padding:16px 24px 40px;font:13px/1.4 system-ui,-apple-system,"Segoe UI",
 Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d2330;background:#fff}
h1{font-size:19px;margin:0 0 8px;display:flex;gap:10px;align-items:center;flex-wrap:wrap}
h2{font-size:15px;margin:22px 0 6px}
.mono,code,td.cores{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
nav a{margin-right:14px;color:#2f6fdb;text-decoration:none}
dl.facts{display:grid;grid-template-columns:max-content 1fr max-content 1fr;gap:2px 12px;
 margin:0 0 6px;max-width:1200px}
dl.facts dt{color:#5b6472}
dl.facts dd{margin:0;overflow-wrap:anywhere}
.badge{color:#fff;border-radius:10px;padding:1px 10px;font-size:13px;font-weight:600}
.badge.s-skipped,.badge.s-pending,.badge.s-waiting{color:#1d2330}
.error{background:#fdecec;border-left:4px solid #d62d2d;padding:6px 10px;margin:6px 0;
 white-space:pre-wrap;overflow-wrap:anywhere;max-width:1200px}
.critline{margin:6px 0}
.critline b{font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:6px 0;color:#3a4250}
.legend span{display:inline-flex;align-items:center;gap:5px}
.sw{display:inline-block;width:14px;height:10px;border-radius:2px}
.sw.critsw{background:#fff;outline:2px solid #111;outline-offset:-2px}
.scroll{overflow-x:auto}
svg.chart{display:block;font-size:12px}
svg.chart text{fill:#1d2330}
svg.chart .axis{fill:#5b6472;font-size:11px}
svg.chart .grid{stroke:#e3e6ea;stroke-width:1}
svg.chart .endline{stroke:#9aa2ad;stroke-dasharray:3 3}
svg.chart .row{fill:#fff}
svg.chart .row.alt{fill:#f6f7f9}
svg.chart .label.shard{fill:#5b6472}
svg.chart .label.crit{font-weight:700}
svg.chart .tail{fill:#5b6472;font-size:11px}
svg.chart .inbar{fill:#fff;font-size:11px;pointer-events:none}
svg.chart .seg{stroke:none}
svg.chart .seg:hover{opacity:.8}
svg.chart .seg.crit{stroke:#111;stroke-width:2}
svg.chart .envelope{opacity:.45}
svg.chart .reused{opacity:.35;stroke:#5b6472;stroke-dasharray:2 2}
table.summary{border-collapse:collapse;margin-top:4px}
table.summary th,table.summary td{padding:2px 12px 2px 0;text-align:left;vertical-align:top}
table.summary th{color:#5b6472;font-weight:600;border-bottom:1px solid #d9dde3}
table.summary td.num{text-align:right}
table.summary tr.shard td:first-child{padding-left:16px;color:#5b6472}
table.summary td.err{max-width:520px;overflow-wrap:anywhere}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:5px}
.empty{color:#5b6472;font-style:italic}
#tip{position:fixed;z-index:10;max-width:460px;background:#1d2330;color:#fff;
 padding:6px 9px;border-radius:4px;font:12px/1.45 ui-monospace,"DejaVu Sans Mono",monospace;
 white-space:pre-wrap;overflow-wrap:anywhere;pointer-events:none;
 box-shadow:0 2px 8px rgba(0,0,0,.25)}
"""

_JS = """
(function () {
  var body = document.body;
  window.addEventListener("error", function (ev) {
    body.setAttribute("data-error", String(ev.message));
  });
  var tip = document.getElementById("tip");
  var marked = document.querySelectorAll("[data-tip]");
  for (var i = 0; i < marked.length; i++) {
    var title = marked[i].querySelector("title");
    if (title) { title.parentNode.removeChild(title); }
  }
  function place(ev) {
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) { x = ev.clientX - tip.offsetWidth - 10; }
    if (y + tip.offsetHeight > window.innerHeight) { y = ev.clientY - tip.offsetHeight - 10; }
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  }
  document.addEventListener("mouseover", function (ev) {
    var el = ev.target && ev.target.closest ? ev.target.closest("[data-tip]") : null;
    if (!el) { tip.hidden = true; return; }
    tip.textContent = el.getAttribute("data-tip");
    tip.hidden = false;
    place(ev);
  });
  document.addEventListener("mousemove", function (ev) { if (!tip.hidden) { place(ev); } });
  body.setAttribute("data-ready", "1");
})();
"""


def _state_css() -> str:
    rules = [f".s-{k}{{fill:{v};background:{v}}}" for k, v in COLOURS.items()]
    rules.append(
        ".s-skipped{fill:url(#hatch);"
        "background:repeating-linear-gradient(45deg,#c9cdd3 0 3px,#eef0f2 3px 6px)}"
    )
    return "\n".join(rules)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _attr(text: str) -> str:
    return _esc(text).replace("\n", "&#10;")


def _dur(v: float | None) -> str:
    return "-" if v is None else format_duration(v)


def _num(v: float) -> str:
    return f"{v:.1f}"


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(chars - 1, 1)] + "…"


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


class _Scale:
    def __init__(self, span: float, left: float) -> None:
        self.span = span
        self.left = left

    def x(self, t: float) -> float:
        if self.span <= 0:
            return self.left
        return self.left + max(0.0, min(t, self.span)) / self.span * CHART_W


def _label_width(labels: Iterable[str]) -> int:
    longest = max((len(s) for s in labels), default=4)
    return max(70, min(16 + CHAR_W * longest, 260))


def _axis(scale: _Scale, height: int) -> list[str]:
    out: list[str] = []
    span = scale.span
    step = _tick_step(span) if span > 0 else 1.0
    n = int(span / step + 1e-9) if span > 0 else 0
    for i in range(n + 1):
        t = i * step
        x = _num(scale.x(t))
        out.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{AXIS_H - 6}" y2="{height - 4}"/>')
        out.append(f'<text class="axis" x="{x}" y="{AXIS_H - 10}" text-anchor="middle">')
        out.append(f"{_esc(_tick_label(t))}</text>")
    if span > 0 and span - n * step > step * 0.25:
        x = _num(scale.x(span))
        out.append(f'<line class="endline" x1="{x}" x2="{x}" y1="{AXIS_H - 6}" y2="{height - 4}"/>')
    return out


def _seg_rect(x0: float, x1: float, y: float, h: float, classes: str, tip: str, state: str) -> str:
    w = max(x1 - x0, MIN_BAR_W)
    return (
        f'<rect class="seg s-{_esc(state)} {classes}" x="{_num(x0)}" y="{_num(y)}"'
        f' width="{_num(w)}" height="{_num(h)}" data-tip="{_attr(tip)}">'
        f"<title>{_esc(tip)}</title></rect>"
    )


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg class="chart" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(label)}">'
    )


def _stage_chart(tl: Timeline, run_state: str) -> str:
    tasks = tl.tasks
    labels = [t.stage if t.shard is None else f"[{t.shard}]" for t in tasks]
    label_w = _label_width(labels)
    chars = (label_w - 16) // CHAR_W
    scale = _Scale(tl.span, label_w)
    width = label_w + CHART_W + TAIL_W
    height = AXIS_H + len(tasks) * ROW_H + 6
    crit = set(tl.critical)
    bg = [_svg_open(width, height, "timeline by stage")]
    out: list[str] = []
    for i, (t, label) in enumerate(zip(tasks, labels, strict=True)):
        y = AXIS_H + i * ROW_H
        by = y + (ROW_H - BAR_H) / 2
        on_path = t.stage in crit
        bg.append(
            f'<rect class="row{" alt" if i % 2 else ""}" x="0" y="{y}"'
            f' width="{width}" height="{ROW_H}"/>'
        )
        cls = "label" + (" shard" if t.shard is not None else "") + (" crit" if on_path else "")
        out.append(
            f'<text class="{cls}" x="{label_w - 8}" y="{y + ROW_H / 2 + 4:.1f}"'
            f' text-anchor="end">{_esc(_clip(label, chars))}<title>{_esc(t.name)}</title></text>'
        )
        crit_cls = "crit" if on_path else ""
        end_x = scale.left
        if t.reused:
            tip = _tip(t, None, run_state)
            out.append(
                _seg_rect(scale.left, scale.left + IDLE_BAR_W, by, BAR_H, "reused", tip, t.state)
            )
            end_x = scale.left + IDLE_BAR_W
            tail = "reused"
        elif t.sharded:
            for seg in t.segments:
                x0, x1 = scale.x(seg.start), scale.x(seg.end)
                tip = _tip(t, seg, run_state)
                out.append(
                    _seg_rect(x0, x1, by + BAR_H / 2 - 3, 6, f"envelope {crit_cls}", tip, seg.state)
                )
                end_x = max(end_x, x0 + max(x1 - x0, MIN_BAR_W))
            tail = _dur(t.duration) + ("" if t.state == "succeeded" else f" · {t.state}")
        elif t.segments:
            for seg in t.segments:
                x0, x1 = scale.x(seg.start), scale.x(seg.end)
                out.append(
                    _seg_rect(x0, x1, by, BAR_H, crit_cls, _tip(t, seg, run_state), seg.state)
                )
                end_x = max(end_x, x0 + max(x1 - x0, MIN_BAR_W))
            tail = _dur(t.duration) + ("" if t.state == "succeeded" else f" · {t.state}")
        else:
            decided = t.end if t.end is not None else 0.0
            x0 = scale.x(decided)
            x1 = max(scale.x(tl.span), x0 + IDLE_BAR_W)
            out.append(_seg_rect(x0, x1, by, BAR_H, "idle", _tip(t, None, run_state), t.state))
            end_x = x1
            tail = t.state
        out.append(
            f'<text class="tail" x="{_num(end_x + 5)}" y="{y + ROW_H / 2 + 4:.1f}">'
            f"{_esc(tail)}</text>"
        )
    # Stripes under the grid, the grid under the bars.
    return "\n".join([*bg, *_axis(scale, height), *out, "</svg>"])


def _core_chart(tl: Timeline, run_state: str) -> str:
    workers = [t for t in tl.tasks if not t.sharded and t.segments]
    cores = sorted({c for t in workers for seg in t.segments for c in seg.cores})
    if not cores:
        return '<p class="empty">No task has run on a core in this run.</p>'
    labels = [f"cpu {c}" for c in cores]
    label_w = _label_width(labels)
    scale = _Scale(tl.span, label_w)
    width = label_w + CHART_W + TAIL_W
    height = AXIS_H + len(cores) * ROW_H + 6
    crit = set(tl.critical)
    bg = [_svg_open(width, height, "timeline by core")]
    out: list[str] = []
    for i, (core, label) in enumerate(zip(cores, labels, strict=True)):
        y = AXIS_H + i * ROW_H
        by = y + (ROW_H - BAR_H) / 2
        bg.append(
            f'<rect class="row{" alt" if i % 2 else ""}" x="0" y="{y}"'
            f' width="{width}" height="{ROW_H}"/>'
        )
        out.append(
            f'<text class="label" x="{label_w - 8}" y="{y + ROW_H / 2 + 4:.1f}"'
            f' text-anchor="end">{_esc(label)}</text>'
        )
        for t in workers:
            crit_cls = "crit" if t.stage in crit else ""
            for seg in t.segments:
                if core not in seg.cores:
                    continue
                x0, x1 = scale.x(seg.start), scale.x(seg.end)
                out.append(
                    _seg_rect(x0, x1, by, BAR_H, crit_cls, _tip(t, seg, run_state), seg.state)
                )
                room = int((x1 - x0 - 6) / 6.5)
                if room >= 3 and seg.state != "skipped":
                    out.append(
                        f'<text class="inbar" x="{_num(x0 + 3)}" y="{y + ROW_H / 2 + 4:.1f}">'
                        f"{_esc(_clip(t.name, room))}</text>"
                    )
    # Stripes under the grid, the grid under the bars.
    return "\n".join([*bg, *_axis(scale, height), *out, "</svg>"])


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
        ("duration", _dur(run.get("duration_seconds"))),
        ("resumed from", run.get("resumed_from") or "-"),
        ("host", run.get("host") or "-"),
        ("submitted by", f"{who.get('user') or '-'} (uid {who.get('uid', '-')})"),
        ("recoveries", str(run.get("recoveries", 0))),
    ]
    cells = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in pairs)
    return f'<dl class="facts">{cells}</dl>'


def _legend() -> str:
    items = [
        f'<span><i class="sw s-{k}"></i>{k.replace("_", " ")}</span>'
        for k in COLOURS
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
            f"{_esc(name)}{mark}",
            f'<i class="dot s-{_esc(t.state)}"></i>{_esc(t.state)}'
            + (" (reused)" if t.reused else ""),
            "-" if t.sharded else str(t.attempts),
            start,
            _dur(t.duration),
            _esc(format_cpulist(t.cores) or "-"),
            _esc(errors[-1]) if errors else "",
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
    badge = RUN_STATE_CLASS.get(state, "pending")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>chute run {_esc(run_id)} · {_esc(run.get('pipeline', '-'))} · {_esc(state)}"
        "</title>",
        f"<style>{_CSS}\n{_state_css()}</style></head>",
        '<body data-ready="0">',
        _HATCH,
        '<div id="tip" hidden></div>',
        f'<h1>chute run <span class="mono">{_esc(run_id)}</span>'
        f' <span class="badge s-{badge}">{_esc(state)}</span></h1>',
        _facts(run),
    ]
    if run.get("error"):
        parts.append(f'<div class="error">error: {_esc(run["error"])}</div>')
    if tl.critical:
        last = next(t for t in tl.tasks if t.stage == tl.critical[-1] and t.shard is None)
        chain = " → ".join(f"<b>{_esc(n)}</b>" for n in tl.critical)
        parts.append(
            f'<p class="critline" id="critical-path">critical path: {chain}'
            f" (ends at +{_dur(last.end)} of {_dur(tl.span)})</p>"
        )
    parts.append(
        '<nav><a href="#by-stage">timeline by stage</a><a href="#by-core">by core</a>'
        '<a href="#summary">summary</a></nav>'
    )
    parts.append(_legend())
    parts.append('<h2 id="by-stage">Timeline by stage</h2>')
    if stages:
        parts.append(f'<div class="scroll">{_stage_chart(tl, state)}</div>')
        parts.append('<h2 id="by-core">Stages and shards on their cores</h2>')
        parts.append(f'<div class="scroll">{_core_chart(tl, state)}</div>')
        parts.append('<h2 id="summary">Execution summary</h2>')
        parts.append(_summary_table(tl))
    else:
        parts.append(
            f'<p class="empty">No stage is known yet: the run is {_esc(state)} and has no'
            " manifest.</p>"
        )
        parts.append('<h2 id="by-core">Stages and shards on their cores</h2>')
        parts.append('<p class="empty">No task has run on a core in this run.</p>')
        parts.append('<h2 id="summary">Execution summary</h2><p class="empty">-</p>')
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "\n".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report.html` from the run's run.json and manifest.json."""
    run, stages = _read(run_dir)
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
