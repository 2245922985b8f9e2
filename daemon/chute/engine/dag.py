"""A run's stages as a state machine: which units may start, and what each result changes.

Owns: stage and unit states, attempts, retries, fallback, failFast, skipping, and the run
state derived from its stages. A *unit* is what runs once per attempt: a whole stage, one
shard of it, or its fallback.
Pure: no I/O and no clock. `now` (monotonic seconds) decides retry delays; `wall` (epoch
seconds) is only recorded. Not here: starting processes, cores and files (chute.engine.loop).
Cost: an event (a start, a result, a retry falling due) costs O(1) or O(log n) whatever the
number of shards: a stage counts its units not yet final instead of scanning them, retries
wait in a heap, and a unit's manifest entry is remade only when the unit changed. Only
once-per-stage steps walk a stage's units (it becomes ready, ends, is skipped or cancelled,
or a shard fails for good).
Attempts: a unit keeps its first ATTEMPTS_FIRST and last ATTEMPTS_LAST attempts, in memory
and in the manifest; `attempts_total` counts them all (the attempt number and the retry
decision use it), `attempts_omitted` says how many are not listed. Each attempt records the
cores it ran on; an entry's `cores` are those of its last listed attempt (a stage's: its
fallback's once that ran; a sharded stage's own entry lists only its fallback's attempts,
so its shards carry theirs).
Ends: a run over (final) has no unit left pending, waiting or running and no attempt
without `finished_at`: `halt` ends what a stopped daemon left open.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chute.clock import rfc3339
from chute.engine.backoff import retry_delay, should_retry
from chute.execution.executor import Result
from chute.spec.model import Pipeline, Stage

STAGE_OK = frozenset({"succeeded", "cached", "fallback"})
STAGE_FINAL = STAGE_OK | {"failed", "timed_out", "cancelled", "skipped"}
UNIT_FINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled", "skipped", "cached"})
ATTEMPTS_FIRST = 3  # attempts of a unit kept from its first ...
ATTEMPTS_LAST = 3  # ... and from its last: at most 6 listed, however many it made


def _time(wall: float | None) -> str | None:
    return None if wall is None else rfc3339(wall)


def _duration(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 6)


@dataclass(slots=True)
class Attempt:
    attempt: int
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    fallback: bool = False
    cores: tuple[int, ...] = ()

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "attempt": self.attempt,
            "started_at": _time(self.started_at),
            "finished_at": _time(self.finished_at),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "cores": list(self.cores),
        }
        if self.fallback:
            rec["fallback"] = True
        return rec


@dataclass(slots=True, eq=False)
class Unit:
    run_id: str
    stage: str
    shard: int | None = None
    fallback: bool = False
    state: str = "pending"
    attempts: list[Attempt] = field(default_factory=list)  # the first and last few
    attempts_total: int = 0  # attempts made (charged), listed or not
    not_before: float = 0.0
    cores: tuple[int, ...] = ()
    data: Any = None
    output_hash: str | None = None
    input_hash: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    _entry: dict[str, Any] | None = None  # its manifest entry, as of `_entry_of`
    _entry_of: tuple[Any, ...] = ()

    @property
    def key(self) -> str:
        """The executor's name for this unit's task (one attempt runs at a time)."""
        where = self.stage if self.shard is None else f"{self.stage}/{self.shard}"
        if self.fallback:
            where += "/fallback"
        return f"{self.run_id}/{where}"

    @property
    def attempts_omitted(self) -> int:
        return self.attempts_total - len(self.attempts)

    def add_attempt(self, wall: float, cores: tuple[int, ...] = ()) -> Attempt:
        """Charge and record the next attempt, started at `wall` on `cores`; forget the
        oldest of the last ones past ATTEMPTS_FIRST + ATTEMPTS_LAST."""
        self.attempts_total += 1
        attempt = Attempt(self.attempts_total, wall, fallback=self.fallback, cores=cores)
        self.attempts.append(attempt)
        if len(self.attempts) > ATTEMPTS_FIRST + ATTEMPTS_LAST:
            del self.attempts[ATTEMPTS_FIRST]
        return attempt

    def drop_attempt(self) -> None:
        """Take back the current attempt: it was lost through no fault of its own."""
        self.attempts.pop()
        self.attempts_total -= 1

    def record(self) -> dict[str, Any]:
        """Manifest fields of one shard; made again only when the shard changed (every
        change of an attempt comes with one of the unit's state, cores or times)."""
        now_of = (self.state, self.attempts_total, self.cores, self.started_at, self.finished_at)
        if self._entry is None or now_of != self._entry_of:
            self._entry_of = now_of
            self._entry = {
                "index": self.shard,
                "state": self.state,
                "cores": list(self.attempts[-1].cores) if self.attempts else [],
                "started_at": _time(self.started_at),
                "finished_at": _time(self.finished_at),
                "duration_seconds": _duration(self.started_at, self.finished_at),
                "attempts": [a.record() for a in self.attempts],
                "attempts_total": self.attempts_total,
                "attempts_omitted": self.attempts_omitted,
                "output": f"stages/{self.stage}/{self.shard}/output.json"
                if self.state == "succeeded"
                else None,
                "log": f"stages/{self.stage}/{self.shard}/log",
            }
        return self._entry


@dataclass(frozen=True, slots=True)
class Reused:
    """A stage finished in an earlier run (or before a crash) whose result this run keeps."""

    entry: Mapping[str, Any]  # its manifest entry, recorded as it was
    data: Any
    output_hash: str | None


@dataclass(slots=True, eq=False)
class StageRun:
    spec: Stage
    units: list[Unit]
    state: str = "pending"
    waiting_on: int = 0
    dependents: list[str] = field(default_factory=list)
    fallback_unit: Unit | None = None
    cache: dict[str, Any] | None = None
    data: Any = None
    output_hash: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    reused: Reused | None = None
    open_units: int = 0  # units (the fallback too) not in UNIT_FINAL
    _final_record: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.open_units = len(self.units)

    @property
    def name(self) -> str:
        return self.spec.name

    def end(self, unit: Unit, state: str) -> None:
        """Put `unit` of this stage in `state`, counting it off when it becomes final."""
        if state in UNIT_FINAL and unit.state not in UNIT_FINAL:
            self.open_units -= 1
        unit.state = state

    def all_units(self) -> list[Unit]:
        return self.units if self.fallback_unit is None else [*self.units, self.fallback_unit]

    def record(self) -> dict[str, Any]:
        """This stage's entry in manifest.json (made once when the stage is final)."""
        if self._final_record is not None:
            return self._final_record
        rec = self._record()
        if self.state in STAGE_FINAL:
            self._final_record = rec
        return rec

    def _record(self) -> dict[str, Any]:
        if self.reused is not None:
            return dict(self.reused.entry)
        s = self.spec
        sharded = s.shards is not None
        counted = (
            self.all_units()
            if not sharded
            else []
            if self.fallback_unit is None
            else [self.fallback_unit]
        )
        attempts = [a.record() for u in counted for a in u.attempts]
        has_output = self.state in STAGE_OK
        return {
            "name": s.name,
            "state": self.state,
            "dependsOn": list(s.depends_on),
            "cpus": s.cpus,
            "cores": attempts[-1]["cores"] if attempts else [],
            "started_at": _time(self.started_at),
            "finished_at": _time(self.finished_at),
            "duration_seconds": _duration(self.started_at, self.finished_at),
            "attempts": attempts,
            "attempts_total": sum(u.attempts_total for u in counted),
            "attempts_omitted": sum(u.attempts_omitted for u in counted),
            "cache": self.cache,
            "output": f"stages/{s.name}/output.json" if has_output else None,
            "log": None if sharded and self.fallback_unit is None else f"stages/{s.name}/log",
            "shards": [u.record() for u in self.units] if sharded else [],
        }


class RunGraph:
    """The stages of one run and their progress."""

    def __init__(
        self, run_id: str, pipeline: Pipeline, reused: Mapping[str, Reused] | None = None
    ) -> None:
        self.run_id = run_id
        self.pipeline = pipeline
        self.stages: dict[str, StageRun] = {}
        self.cancelled = False
        self.aborted: str | None = None  # why the run failed as a whole (see abort)
        self.fail_fast_fired = False
        self._ready: deque[Unit] = deque()
        self._delayed: list[tuple[float, int, Unit]] = []  # a heap: (not_before, n, unit)
        self._delays = itertools.count()  # n: ties in the heap go in the order delayed
        self._open = len(pipeline.stages)  # stages not final yet
        reused = reused or {}
        for spec in pipeline.stages:
            if spec.shards is None:
                units = [Unit(run_id, spec.name)]
            else:
                units = [Unit(run_id, spec.name, i) for i in range(spec.shards.count)]
            self.stages[spec.name] = StageRun(spec, units)
        for spec in pipeline.stages:
            for dep in spec.depends_on:
                self.stages[dep].dependents.append(spec.name)
        failed_before: list[StageRun] = []
        for stage in self.stages.values():
            old = reused.get(stage.name)
            if old is None or old.entry.get("state") not in STAGE_OK | {"failed", "timed_out"}:
                continue
            stage.reused = old
            stage.state = str(old.entry["state"])
            stage.data = old.data
            stage.output_hash = old.output_hash
            self._open -= 1
            for u in stage.units:
                stage.end(u, "succeeded" if stage.state in STAGE_OK else stage.state)
            if stage.state not in STAGE_OK:
                failed_before.append(stage)
        for stage in failed_before:
            self._skip(stage.dependents, None)
        for stage in self.stages.values():
            stage.waiting_on = sum(
                1 for d in stage.spec.depends_on if self.stages[d].state not in STAGE_OK
            )
        for stage in self.stages.values():
            if stage.state == "pending" and stage.waiting_on == 0:
                self._make_ready(stage)

    # -- queries ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._open == 0

    @property
    def state(self) -> str:
        """The run state derived from its stages: running until every stage is final."""
        if not self.done:
            return "running"
        if self.aborted is not None:
            return "failed"
        if self.cancelled:
            return "cancelled"
        if any(s.state not in STAGE_OK for s in self.stages.values()):
            return "failed"
        return "succeeded"

    def next_retry(self) -> float | None:
        """Monotonic time of the earliest delayed retry, if any."""
        while self._delayed and self._delayed[0][2].state != "pending":
            heapq.heappop(self._delayed)  # skipped or cancelled while it waited
        return self._delayed[0][0] if self._delayed else None

    def delayed(self) -> list[tuple[float, Unit]]:
        """The units waiting out a retry delay, with the monotonic time each may start."""
        return [(t, u) for t, _, u in self._delayed if u.state == "pending"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.stages.values():
            out[s.state] = out.get(s.state, 0) + 1
        return out

    def manifest(self) -> list[dict[str, Any]]:
        return [s.record() for s in self.stages.values()]

    def upstream_data(self, stage: Stage) -> dict[str, Any]:
        return {d: self.stages[d].data for d in stage.depends_on}

    # -- transitions -----------------------------------------------------------------------

    def take_ready(self, now: float) -> list[Unit]:
        """Units whose turn has come (dependencies done, retry delay over), each once.

        They are `waiting` (for CPUs) until `start`; the caller keeps them queued.
        """
        while self._delayed and self._delayed[0][0] <= now:
            self._ready.append(heapq.heappop(self._delayed)[2])
        out: list[Unit] = []
        while self._ready:
            u = self._ready.popleft()
            if u.state == "pending":
                u.state = "waiting"
                stage = self.stages[u.stage]
                if stage.state == "pending":
                    stage.state = "waiting"
                out.append(u)
        return out

    def start(self, unit: Unit, cores: tuple[int, ...], wall: float) -> None:
        unit.state = "running"
        unit.cores = cores
        unit.add_attempt(wall, cores)
        if unit.started_at is None:
            unit.started_at = wall
        stage = self.stages[unit.stage]
        stage.state = "running"
        if stage.started_at is None:
            stage.started_at = wall

    def cache_hit(self, stage_name: str, data: Any, output_hash: str | None, wall: float) -> None:
        stage = self.stages[stage_name]
        for u in stage.units:
            stage.end(u, "cached")
        stage.data = data
        stage.output_hash = output_hash
        stage.started_at = stage.started_at or wall
        if stage.cache is not None:
            stage.cache["hit"] = True
        self._finish_stage(stage, "cached", wall)

    def finish(
        self,
        unit: Unit,
        result: Result,
        now: float,
        wall: float,
        data: Any = None,
        output_hash: str | None = None,
    ) -> list[Unit]:
        """Record how the current attempt of `unit` ended; returns running units to cancel."""
        if result.lost:
            # The executor lost the task through no fault of its own: run it again, uncharged.
            unit.drop_attempt()
            unit.state = "pending"
            self._ready.append(unit)
            return []
        attempt = unit.attempts[-1]
        attempt.finished_at = wall
        attempt.exit_code = result.exit_code
        attempt.signal = result.signal
        attempt.error = result.error
        stage = self.stages[unit.stage]
        if result.ok:
            unit.data = data
            unit.output_hash = output_hash
            stage.end(unit, "succeeded")
        elif result.cancelled:
            stage.end(unit, "cancelled")
        elif (
            not unit.fallback
            and not self.stopping
            and not self.fail_fast_fired
            and should_retry(stage.spec.retries, unit.attempts_total, result.exit_code)
        ):
            unit.state = "pending"
            unit.not_before = now + retry_delay(stage.spec.retries, unit.attempts_total)
            heapq.heappush(self._delayed, (unit.not_before, next(self._delays), unit))
            return []
        else:
            stage.end(unit, "timed_out" if result.timed_out else "failed")
            # A shard that failed for good dooms its stage: its siblings not yet started never will.
            for sibling in stage.units:
                if sibling.state in ("pending", "waiting"):
                    stage.end(sibling, "skipped")
        unit.finished_at = wall
        return self._settle(stage, wall)

    def cancel(self, wall: float) -> list[Unit]:
        """Cancel the run: nothing new starts; returns the running units to stop."""
        self.cancelled = True
        return self._stop_everything(wall)

    def abort(self, reason: str, wall: float) -> list[Unit]:
        """Fail the run as a whole for `reason` (its folder cannot be written): stop as a
        cancel does, but the run ends `failed`; returns the running units to stop."""
        if self.aborted is None:
            self.aborted = reason
        return self._stop_everything(wall)

    def halt(self, reason: str, wall: float, *, resumes: bool) -> None:
        """The daemon stopped under the run, its tasks stopped with it: every attempt still
        open ends at `wall` with `reason`. `resumes`: the stages not finished go back to
        `pending` (they run when the run resumes); else they end `cancelled` with every unit
        not final, and the run is over (the caller records it `interrupted`)."""
        self._ready.clear()
        self._delayed = []
        for stage in self.stages.values():
            if stage.state in STAGE_FINAL:
                continue
            for u in stage.all_units():
                if u.state == "running" and u.attempts and u.attempts[-1].finished_at is None:
                    attempt = u.attempts[-1]
                    attempt.finished_at = wall
                    attempt.error = attempt.error or reason
                if u.state in UNIT_FINAL:
                    continue
                if resumes:
                    u.state = "pending"
                else:
                    u.finished_at = wall
                    stage.end(u, "cancelled")
            if resumes:
                stage.state = "pending"
            else:
                self._open -= 1
                stage.state = "cancelled"
                stage.finished_at = wall

    @property
    def stopping(self) -> bool:
        """Cancelled or aborted: no retry, no fallback, nothing new starts."""
        return self.cancelled or self.aborted is not None

    # -- internals -------------------------------------------------------------------------

    def _make_ready(self, stage: StageRun) -> None:
        for u in stage.units:
            if u.state == "pending":
                self._ready.append(u)

    def _stop_everything(self, wall: float) -> list[Unit]:
        running: list[Unit] = []
        self._delayed = []
        for stage in self.stages.values():
            if stage.state in STAGE_FINAL:
                continue
            for u in stage.all_units():
                if u.state in ("pending", "waiting"):
                    u.finished_at = wall
                    stage.end(u, "cancelled")
                elif u.state == "running":
                    running.append(u)
            if not any(u.state == "running" for u in stage.all_units()):
                self._finish_stage(stage, "cancelled", wall)
        return running

    def _settle(self, stage: StageRun, wall: float) -> list[Unit]:
        if stage.open_units > 0:
            return []
        fb = stage.fallback_unit
        if fb is not None:
            outcome = "fallback" if fb.state == "succeeded" else fb.state
            if outcome == "fallback":
                stage.data = fb.data
                stage.output_hash = fb.output_hash
            return self._finish_stage(stage, outcome, wall)
        states = {u.state for u in stage.units}
        if states == {"succeeded"}:
            if stage.spec.shards is None:
                stage.data = stage.units[0].data
                stage.output_hash = stage.units[0].output_hash
            else:
                stage.data = [u.data for u in stage.units]
            return self._finish_stage(stage, "succeeded", wall)
        if "cancelled" in states and (self.stopping or self.fail_fast_fired):
            return self._finish_stage(stage, "cancelled", wall)
        outcome = "timed_out" if "timed_out" in states and "failed" not in states else "failed"
        spec_fb = stage.spec.fallback
        if spec_fb is not None and not self.stopping and not self.fail_fast_fired:
            stage.fallback_unit = Unit(self.run_id, stage.name, fallback=True)
            stage.open_units += 1
            self._ready.append(stage.fallback_unit)
            return []
        return self._finish_stage(stage, outcome, wall)

    def _finish_stage(self, stage: StageRun, outcome: str, wall: float) -> list[Unit]:
        if stage.state in STAGE_FINAL:
            return []  # already settled: a stage ends once
        self._open -= 1
        stage.state = outcome
        stage.finished_at = wall
        if outcome in STAGE_OK:
            for name in stage.dependents:
                dep = self.stages[name]
                dep.waiting_on -= 1
                if dep.waiting_on == 0 and dep.state == "pending":
                    self._make_ready(dep)
            return []
        self._skip(stage.dependents, wall)
        if outcome != "cancelled" and self.pipeline.fail_fast and not self.fail_fast_fired:
            self.fail_fast_fired = True
            return self._stop_everything(wall)
        return []

    def _skip(self, names: Iterable[str], wall: float | None) -> None:
        todo = list(names)
        while todo:
            stage = self.stages[todo.pop()]
            if stage.state in STAGE_FINAL:
                continue
            self._open -= 1
            stage.state = "skipped"
            stage.finished_at = wall
            for u in stage.units:
                stage.end(u, "skipped")
            todo.extend(stage.dependents)
