"""A run's timeline: its stages and shards as rows of attempts on one time axis, and its
critical path, read from run.json and manifest.json.

Owns: the model both drawings share (chute.observe.report.html, chute.observe.report.text):
one row per stage and per shard, each attempt a segment in seconds from the run's first
start, and the chain of stages whose finish times set the run's end. It only reads the
run's files (chute.store.rundir and chute.engine own them) and writes nothing. Not here:
drawing.
Limits: each attempt keeps the cores it ran on (an older manifest's attempts, which do not
say, take their task's); an attempt with no finish yet ends at the latest time the files
know. Attempts the manifest leaves out (a task's beyond its first and last three) have no
segment; the counts include them. Stages a `chute retry` reused kept the old run's times:
they are marked reused, get no segment on this run's clock, and never join the critical
path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from chute.clock import parse_rfc3339
from chute.store import rundir

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


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's run.json and its manifest's stages (none while it is queued)."""
    run: dict[str, Any] = rundir.read_json(run_dir / "run.json")
    try:
        stages: list[dict[str, Any]] = rundir.read_json(run_dir / "manifest.json")["stages"]
    except FileNotFoundError:
        stages = []  # queued: the engine has not written a manifest yet
    return run, stages


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
