"""A run's stages as a state machine: which units may start, and what each result changes.

Owns: a run's progress through its stages (chute.engine.stage): which units are ready,
retries and their delays, fallback, failFast, skipping, cancelling, and the run state
derived from its stages. Not here: starting processes, cores and files (chute.engine.loop).
Pure: no I/O and no clock. `mono` (monotonic seconds) decides retry delays; `wall` (epoch
seconds) is only recorded.
Cost: an event (a start, a result, a retry falling due) costs O(1) or O(log n) whatever the
number of shards: a stage counts its units not yet final instead of scanning them, and
retries wait in a heap. Only once-per-stage steps walk a stage's units (it becomes ready,
ends, is skipped or cancelled, or a shard fails for good).
Ends: a run over (final) has no unit left pending, waiting or running and no attempt
without `finished_at`: `halt` ends what a stopped daemon left open.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from chute.engine.backoff import retry_delay, should_retry
from chute.engine.stage import STAGE_FINAL, STAGE_OK, UNIT_FINAL, Reused, StageRun, Unit
from chute.execution.executor import Result
from chute.spec.model import Pipeline, Stage


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

    def error(self) -> str | None:
        """run.json's `error` once the run is over: why it failed or was cancelled, naming
        the first stage that failed and its last attempt's error."""
        if self.aborted is not None:
            return self.aborted
        if self.cancelled:
            return "cancelled"
        for stage in self.stages.values():
            if stage.state in ("failed", "timed_out"):
                errors = [
                    a.error or (f"exit code {a.exit_code}" if a.exit_code else None)
                    for u in stage.all_units()
                    for a in u.attempts
                ]
                last = next((e for e in reversed(errors) if e), None)
                detail = f": {last}" if last else ""
                return f"stage {stage.name} {stage.state.replace('_', ' ')}{detail}"
        return None

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
        return [s.entry() for s in self.stages.values()]

    def upstream_data(self, stage: Stage) -> dict[str, Any]:
        return {d: self.stages[d].data for d in stage.depends_on}

    # -- transitions -----------------------------------------------------------------------

    def take_ready(self, mono: float) -> list[Unit]:
        """Units whose turn has come (dependencies done, retry delay over), each once.

        They are `waiting` (for CPUs) until `start`; the caller keeps them queued.
        """
        while self._delayed and self._delayed[0][0] <= mono:
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
        mono: float,
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
            unit.not_before = mono + retry_delay(stage.spec.retries, unit.attempts_total)
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
