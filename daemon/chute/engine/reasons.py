"""Why work waits: the reasons, and the report the engine publishes with its status.

Owns: the words for what a task, stage or run not started waits for, the report of the
engine's waiting units (`report`: runs in queue order, each with its waiting stages), and
that report's JSON form, which state/status.json, `chute status`, `chute show` and
GET /api/v1/runs/<id> share. Not here: deciding a reason (chute.scheduling.allocator says why a
request does not fit, chute.engine.waitlist which stage it concerns, chute.engine.loop
what pauses the engine), writing the status (the daemon).
Pure: no I/O, no clock; times are given in (`wall` epoch seconds, `mono` monotonic).

Reasons (`for`):
- cpus: too few free cores when its turn came.
- memory: the cores were there, the free memory was not.
- backfill: it fit, but only on cores or memory `policy: backfill` holds for the head of
  the queue (a task that would end before the head's start, by its timeout, may use them).
- node: it asks for more cpus or memory than the node has now (a reload took them away).
- disk: the spool cannot be written (a full disk): nothing starts until it can.
- stopping: the daemon is stopping: nothing new starts.
- retry: a failed attempt waits out its retry delay (`until` says when it may start).
- dependency: a stage waits for the stages it depends on (readers derive it from the
  manifest or the spec: it is not in the engine's report).
- held, schedule: no run yet, a schedule's fire held by `overlap: queue`, or its next fire
  (the daemon's status lists them beside the runs).
TASK_REASONS are the first six: the label set of chute_tasks_waiting{reason}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from chute.clock import rfc3339
from chute.engine.dag import RunGraph
from chute.engine.running import free_of
from chute.engine.waitlist import Waitlist
from chute.scheduling import allocator
from chute.scheduling.topology import Topology
from chute.units import format_size

DISK, STOPPING, RETRY, DEPENDENCY, HELD, SCHEDULE = (
    "disk",
    "stopping",
    "retry",
    "dependency",
    "held",
    "schedule",
)
TASK_REASONS = (*allocator.WAIT_REASONS, DISK, STOPPING)
"""Why a ready task waits (chute_tasks_waiting{reason}): a bounded set."""
REASONS = (*TASK_REASONS, RETRY, DEPENDENCY, HELD, SCHEDULE)


class StageWait(NamedTuple):
    """A stage's units that wait for one reason: `tasks` of them, each asking for `cpus`
    and `memory`, waiting since `since`; a retry may start at `until`. A tuple: a long
    queue makes thousands each second."""

    stage: str
    reason: str
    since: float
    tasks: int
    cpus: int
    memory: int
    until: float | None = None

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stage": self.stage,
            "for": self.reason,
            "since": rfc3339(self.since),
            "tasks": self.tasks,
            "cpus": self.cpus,
            "memory": self.memory,
        }
        if self.until is not None:
            out["until"] = rfc3339(self.until)
        return out


@dataclass(slots=True)
class RunWait:
    """A run with units not started: the reason of the one next in queue order, since when
    its stages wait, its place among the runs waiting for cores (None: it only waits out
    retry delays), and its stages."""

    run_id: str
    reason: str
    since: float
    position: int | None
    stages: list[StageWait] = field(default_factory=list)

    def doc(self) -> dict[str, Any]:
        """GET /api/v1/runs/<id>'s `waiting`."""
        return {"for": self.reason, "since": rfc3339(self.since), "position": self.position}

    def full_doc(self) -> dict[str, Any]:
        """state/status.json's entry: `doc` with the run id and the stages."""
        return {"run_id": self.run_id, **self.doc(), "stages": [s.doc() for s in self.stages]}


@dataclass(slots=True)
class Waiting:
    """`report`'s answer: runs in queue order, ready tasks by reason (TASK_REASONS),
    tasks waiting out a retry delay, and the cores and memory free now."""

    free: int
    free_memory: int
    runs: list[RunWait] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TASK_REASONS, 0))
    retrying: int = 0


def report(
    waitlist: Waitlist[Any],
    grants: list[allocator.Grant],
    topology: Topology,
    policy: str,
    *,
    paused: str | None,
    retrying: Sequence[tuple[str, RunGraph]],
    mono: float,
    wall: float,
) -> Waiting:
    """Why the units that have not started wait, run by run in queue order: the
    allocator's reasons for the units it would see now (a decision made, and not acted on;
    `grants`: the running tasks'), `paused` (STOPPING, DISK) over every one of them, and the
    units of `retrying` ((run id, its graph), in run id order) waiting out a retry delay."""
    free, free_memory = free_of(topology, grants)
    whole, whole_memory = len(topology.cpus), topology.memory
    why: dict[str, str] = {}
    starts: list[tuple[allocator.Request, tuple[int, ...]]] = []
    if len(waitlist) and free:
        picked = waitlist.candidates(free, free_memory, whole, whole_memory, policy)
        requests = [req for _, _, req in picked]
        starts = allocator.allocate(requests, grants, topology, policy, mono, why)
    out = Waiting(free=free, free_memory=free_memory)
    by_run: dict[str, list[StageWait]] = {}
    for g in waitlist.explain(
        why, {r.key for r, _ in starts}, free, free_memory, whole, whole_memory
    ):
        reason = paused or g.reason
        out.tasks[reason] += g.units
        stage = g.owner.pipeline.stages[g.position]
        wait = StageWait(stage.name, reason, g.since, g.units, g.cpus, g.memory)
        if g.run_id not in by_run:
            by_run[g.run_id] = []
            out.runs.append(RunWait(g.run_id, reason, g.since, g.rank))
        by_run[g.run_id].append(wait)
    for run_id, graph in retrying:
        for t, unit in sorted(graph.delayed(), key=lambda e: e[0]):
            out.retrying += 1
            last = unit.attempts[-1] if unit.attempts else None
            since = last.finished_at if last is not None and last.finished_at else wall
            spec = graph.stages[unit.stage].spec
            wait = StageWait(unit.stage, RETRY, since, 1, spec.cpus, spec.memory, wall + t - mono)
            if run_id not in by_run:
                by_run[run_id] = []
                out.runs.append(RunWait(run_id, RETRY, since, None))
            by_run[run_id].append(wait)
    for r in out.runs:
        r.stages = merged(by_run[r.run_id])
        if len(r.stages) > 1:
            r.since = min(s.since for s in r.stages)
    return out


def merged(stages: list[StageWait]) -> list[StageWait]:
    """One entry per stage and reason (a sharded stage's retrying shards are one), in the
    order first seen; `since` and `until` the earliest."""
    if len(stages) == 1:
        return stages
    out: dict[tuple[str, str], StageWait] = {}
    for s in stages:
        seen = out.get((s.stage, s.reason))
        if seen is None:
            out[(s.stage, s.reason)] = s
            continue
        untils = [t for t in (seen.until, s.until) if t is not None]
        out[(s.stage, s.reason)] = StageWait(
            s.stage,
            s.reason,
            min(seen.since, s.since),
            seen.tasks + s.tasks,
            s.cpus,
            s.memory,
            min(untils) if untils else None,
        )
    return list(out.values())


def describe(stage: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    """One stage's wait as `chute show` prints it: the reason, then what it needs against
    what there is. `stage`: a StageWait's doc; `status`: state/status.json."""
    reason = str(stage.get("for"))
    cpus, memory = int(stage.get("cpus", 0)), int(stage.get("memory", 0))
    total = sum(int(n["total"]) for n in status.get("cpus", []))
    free = total - sum(int(n["allocated"]) for n in status.get("cpus", []))
    mem = status.get("memory") or {}
    if reason == allocator.CPUS:
        return f"cpus (needs {cpus}, {free} of {total} free)"
    if reason == allocator.MEMORY:
        return (
            f"memory (needs {format_size(memory)}, {format_size(int(mem.get('free', 0)))} of "
            f"{format_size(int(mem.get('total', 0)))} free)"
        )
    if reason == allocator.BACKFILL:
        return "backfill (what it fits in is held for the head of the queue)"
    if reason == allocator.NODE and cpus > total:
        return f"node (asks for {cpus} cpus, the node has {total})"
    if reason == allocator.NODE:
        node_memory = format_size(int(mem.get("total", 0)))
        return f"node (asks for {format_size(memory)} of memory, the node has {node_memory})"
    if reason == DISK:
        return "disk (the spool cannot be written; nothing starts until it can)"
    if reason == STOPPING:
        return "stopping (the daemon is stopping; nothing new starts)"
    if reason == RETRY and stage.get("until"):
        return f"retry (at {stage['until']})"
    return reason
