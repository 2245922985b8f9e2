"""A run's stages as a state machine: which units may start, and what each result changes.

Owns: stage and unit states, attempts, retries, fallback, failFast, skipping, and the run
state derived from its stages. A *unit* is what runs once per attempt: a whole stage, one
shard of it, or its fallback.
Pure: no I/O and no clock. `now` (monotonic seconds) decides retry delays; `wall` (epoch
seconds) is only recorded. Not here: starting processes, cores and files (chute.engine.loop).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chute.clock import rfc3339
from chute.engine.retry import retry_delay, should_retry
from chute.executor import Result
from chute.spec.model import Pipeline, Stage

STAGE_OK = frozenset({"succeeded", "cached", "fallback"})
STAGE_FINAL = STAGE_OK | {"failed", "timed_out", "cancelled", "skipped"}
UNIT_FINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled", "skipped", "cached"})


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

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "attempt": self.attempt,
            "started_at": _time(self.started_at),
            "finished_at": _time(self.finished_at),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
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
    attempts: list[Attempt] = field(default_factory=list)
    not_before: float = 0.0
    cores: tuple[int, ...] = ()
    data: Any = None
    output_hash: str | None = None
    input_hash: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def key(self) -> str:
        """The executor's name for this unit's task (one attempt runs at a time)."""
        where = self.stage if self.shard is None else f"{self.stage}/{self.shard}"
        if self.fallback:
            where += "/fallback"
        return f"{self.run_id}/{where}"

    def record(self) -> dict[str, Any]:
        """Manifest fields of one shard."""
        return {
            "index": self.shard,
            "state": self.state,
            "cores": list(self.cores),
            "started_at": _time(self.started_at),
            "finished_at": _time(self.finished_at),
            "duration_seconds": _duration(self.started_at, self.finished_at),
            "attempts": [a.record() for a in self.attempts],
            "output": f"stages/{self.stage}/{self.shard}/output.json"
            if self.state == "succeeded"
            else None,
            "log": f"stages/{self.stage}/{self.shard}/log",
        }


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
    _final_record: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

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
        units = self.all_units()
        cores = sorted({c for u in units for c in u.cores})
        attempts: list[dict[str, Any]] = []
        if not sharded:
            attempts = [a.record() for u in units for a in u.attempts]
        elif self.fallback_unit is not None:
            attempts = [a.record() for a in self.fallback_unit.attempts]
        has_output = self.state in STAGE_OK
        return {
            "name": s.name,
            "state": self.state,
            "dependsOn": list(s.depends_on),
            "cpus": s.cpus,
            "cores": cores,
            "started_at": _time(self.started_at),
            "finished_at": _time(self.finished_at),
            "duration_seconds": _duration(self.started_at, self.finished_at),
            "attempts": attempts,
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
        self._delayed: list[Unit] = []
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
                u.state = "succeeded" if stage.state in STAGE_OK else stage.state
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
        return min((u.not_before for u in self._delayed), default=None)

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
        if self._delayed:
            due = [u for u in self._delayed if u.not_before <= now]
            if due:
                self._delayed = [u for u in self._delayed if u.not_before > now]
                self._ready.extend(due)
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
        unit.attempts.append(Attempt(len(unit.attempts) + 1, wall, fallback=unit.fallback))
        if unit.started_at is None:
            unit.started_at = wall
        stage = self.stages[unit.stage]
        stage.state = "running"
        if stage.started_at is None:
            stage.started_at = wall

    def cache_hit(self, stage_name: str, data: Any, output_hash: str | None, wall: float) -> None:
        stage = self.stages[stage_name]
        for u in stage.units:
            u.state = "cached"
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
            unit.attempts.pop()
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
            unit.state = "succeeded"
            unit.data = data
            unit.output_hash = output_hash
        elif result.cancelled:
            unit.state = "cancelled"
        elif (
            not unit.fallback
            and not self.stopping
            and not self.fail_fast_fired
            and should_retry(stage.spec.retries, len(unit.attempts), result.exit_code)
        ):
            unit.state = "pending"
            unit.not_before = now + retry_delay(stage.spec.retries, len(unit.attempts))
            self._delayed.append(unit)
            return []
        else:
            unit.state = "timed_out" if result.timed_out else "failed"
            # A shard that failed for good dooms its stage: its siblings not yet started never will.
            for sibling in stage.units:
                if sibling.state in ("pending", "waiting"):
                    sibling.state = "skipped"
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
                    u.state = "cancelled"
                    u.finished_at = wall
                elif u.state == "running":
                    running.append(u)
            if not any(u.state == "running" for u in stage.all_units()):
                self._finish_stage(stage, "cancelled", wall)
        return running

    def _settle(self, stage: StageRun, wall: float) -> list[Unit]:
        units = stage.all_units()
        if any(u.state not in UNIT_FINAL for u in units):
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
                u.state = "skipped"
            todo.extend(stage.dependents)
