"""The engine loop: ready units of every active run, through the allocator, to the executor.

Owns: the active runs and their queue (which runs have units to look at, which wait out a
retry delay), the cores each running task holds, each `step` (results recorded, ready
units started, writes handed on), failing a run whose folder cannot be written, and a
stopping daemon's runs (`interrupt`). It delegates: a unit to a Task (chute.engine.start),
a Result to files (chute.engine.results), the group commits (chute.engine.writes), why
units wait (chute.engine.reasons). Not here: stage states (chute.engine.dag), the units
waiting for CPUs and which of them the allocator sees (chute.engine.waitlist), processes
(chute.execution.local), which cores (chute.scheduling.allocator).
Crash safety: see chute.engine.writes (the order of a step's writes) and
chute.engine.results (done-marks). A run folder with stage folders and a run.json still
`queued` had started: recovery counts it so (chute.engine.recovery.started_on_disk). A
stopping daemon (`interrupt`) ends the open attempts of the runs it leaves, so their
manifests never say a task runs that does not.
Diagnostics: a task's own failure is recorded in the manifest. A run folder is hostile
input (its tasks may remove or replace anything in it): a path of the run that cannot be
written (its manifest, a stage folder) fails the run, whose run.json says which path and
why; no room on the spool pauses every start instead (chute.engine.writes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from chute.clock import Clock, rfc3339
from chute.engine import reasons, results, start
from chute.engine.running import Held, Running, free_of
from chute.engine.runs import ActiveRun
from chute.engine.stage import STAGE_FINAL, STAGE_OK, Unit
from chute.engine.waitlist import Waitlist
from chute.engine.writes import Writes
from chute.execution.executor import Executor, Result
from chute.faults import crash_point
from chute.scheduling import allocator
from chute.scheduling.topology import Topology
from chute.store import atomic
from chute.store.spool import Spool

log = logging.getLogger(__name__)

DISK_PROBE_WAKE = 1.0  # seconds between steps while the spool cannot be written


class EngineEvents(Protocol):
    """What the engine reports as it happens (chute.observe.metrics.Metrics is one); plain calls,
    on the loop's thread, so the engine needs no metrics library."""

    def run_started(self, accepted: float, wall: float) -> None: ...
    def stage_finished(self, seconds: float) -> None: ...
    def retry_scheduled(self) -> None: ...
    def cache_hit(self) -> None: ...


class Engine:
    """Drives runs. The executor hands each Result to `deliver`; `step()` records what was
    delivered, starts what can start, writes what changed, and says when to step again."""

    def __init__(
        self,
        *,
        spool: Spool,
        executor: Executor,
        topology: Topology,
        policy: str = "fifo-first-fit",
        clock: Clock | None = None,
        on_finished: Callable[[ActiveRun], None] | None = None,
        events: EngineEvents | None = None,
        syncfs: Sequence[Path] = (),
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_finished(run)`: in the writer thread, once a run's final run.json is durable.
        `syncfs`: filesystems to sync whole per group commit (groupcommit.own_filesystems).
        `wake`: makes the loop step soon; the writer thread calls it when it hands the loop
        something (a file it could not write, a finished run whose end did not land)."""
        self.spool = spool
        self.executor = executor
        self.topology = topology
        self.policy = policy
        self.clock = clock or Clock()
        self.events = events
        self.runs: dict[str, ActiveRun] = {}
        self.writes = Writes(
            spool=spool, clock=self.clock, syncfs=syncfs, wake=wake, on_finished=on_finished
        )
        self._inbox: list[Result] = []  # delivered since the last step
        self._check: set[str] = set()  # runs to look at in the next step
        self._retrying: set[str] = set()  # runs with a unit waiting out a retry delay
        self._waitlist: Waitlist[ActiveRun] = Waitlist()  # units waiting for CPUs
        self.tasks_held = 0  # tasks of the active runs (Pipeline.tasks), for backpressure
        self._running = Running()
        self.draining = False  # stopping: start nothing new, let running tasks end
        self._empty_inputs: Path | None = None

    # -- public ----------------------------------------------------------------------------

    def add(self, run: ActiveRun) -> None:
        self.runs[run.run_id] = run
        self.tasks_held += run.pipeline.tasks
        self._check.add(run.run_id)
        for i, s in enumerate(run.pipeline.stages):
            run.stage_index[s.name] = i

    def cancel(self, run_id: str) -> bool:
        run = self.runs.get(run_id)
        if run is None:
            return False
        for unit in run.graph.cancel(self.clock.time()):
            self.executor.cancel(unit.key)
        self._waitlist.prune(run_id)
        self._check.add(run_id)
        self.writes.dirty(run, urgent=True)
        self._end_if_done(run)
        return True

    @property
    def cores_in_use(self) -> int:
        return self._running.cores_in_use()

    def cores_by_node(self) -> dict[int, int]:
        """Cores held by running tasks, by NUMA node."""
        return self._running.cores_by_node(self.topology)

    def waiting_beyond(self, topology: Topology) -> list[str]:
        """Keys of waiting tasks that ask for more cpus or memory than `topology` has."""
        return self._waitlist.beyond(len(topology.cpus), topology.memory)

    @property
    def tasks_running(self) -> int:
        return len(self._running)

    @property
    def tasks_waiting(self) -> int:
        return len(self._waitlist)

    @property
    def write_error(self) -> OSError | None:
        """Why the spool cannot be written now (a full disk), or None."""
        return self.writes.error

    def waiting(self) -> reasons.Waiting:
        """Why the units that have not started wait (chute.engine.reasons.report), for the
        status, once a second."""
        paused = (
            reasons.STOPPING
            if self.draining
            else reasons.DISK
            if self.write_error is not None
            else None
        )
        retrying = [(i, self.runs[i].graph) for i in sorted(self._retrying) if i in self.runs]
        return reasons.report(
            self._waitlist,
            self._running.grants(),
            self.topology,
            self.policy,
            paused=paused,
            retrying=retrying,
            mono=self.clock.monotonic(),
            wall=self.clock.time(),
        )

    def step(self) -> float | None:
        """Queue what became ready, start what fits, write what changed.

        Returns the seconds until the engine must step again without a result (None: only
        a result or a new run can change anything).
        """
        if self._inbox:
            delivered, self._inbox = self._inbox, []
            self._apply_all(delivered)
        mono = self.clock.monotonic()
        wall = self.clock.time()
        self._act_on_unwritten()
        # Only runs that changed (new, a result, a cancel) or whose retry delay is over can
        # have new ready units: with thousands of queued runs, looking at all of them on
        # every step would make a burst quadratic.
        check, self._check = self._check, set()
        retry_wake: float | None = None
        for run_id in list(self._retrying):
            retry_run = self.runs.get(run_id)
            t = None if retry_run is None else retry_run.graph.next_retry()
            if t is None:
                self._retrying.discard(run_id)
            elif t <= mono:
                check.add(run_id)
            else:
                retry_wake = t if retry_wake is None else min(retry_wake, t)
        for run_id in check:
            run = self.runs.get(run_id)
            if run is None:
                continue
            for unit in run.graph.take_ready(mono):
                self._enqueue(run, unit, wall)
            self._end_if_done(run)
        paused = self.writes.paused(mono)  # probes even when nothing waits, to clear it
        if len(self._waitlist) and not self.draining and not paused:
            self._start_ready(mono, wall)
        self.writes.flush()
        if self._check:
            return 0.0  # this step made more ready (a cache hit): look again at once
        if self.writes.disk_error is not None:
            retry_wake = _sooner(retry_wake, mono + DISK_PROBE_WAKE)
        wake = _sooner(self.writes.next_due(), retry_wake)
        return None if wake is None else max(0.0, wake - self.clock.monotonic())

    def use_syncfs(self, roots: Sequence[Path]) -> None:
        """Sync group commits with syncfs(2) on `roots` ([]: fsync per file) from now on."""
        self.writes.use_syncfs(roots)

    def sync_then(self, unsynced: atomic.Unsynced, on_done: Callable[[], None]) -> None:
        """Make `unsynced` durable in the writer thread, in order with the engine's writes,
        then call `on_done` there (the daemon's intake hands runs over this way)."""
        self.writes.sync_then(unsynced, on_done)

    def deliver(self, result: Result) -> None:
        """A task ended (the executor's on_result): recorded at the next step, with the
        others that ended meanwhile."""
        self._inbox.append(result)

    def run_until_done(
        self,
        wait: Callable[[float | None], object],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Drive until no run is active, waiting in `wait(timeout)` (the reactor the executor
        registered with) between steps; `should_stop()` true cancels every run."""
        stopping = False
        while self.runs:
            if not stopping and should_stop():
                stopping = True
                for run_id in list(self.runs):
                    self.cancel(run_id)
            timeout = _sooner(self.executor.tick(self.clock.monotonic()), self.step())
            if not self.runs:
                break
            wait(timeout)
        self.writes.flush()
        while not self.writes.landed():  # a final run.json that could not be written is
            self._act_on_unwritten()  # written once more
            self.writes.flush()

    def interrupt(self, *, resumes: bool = True) -> list[ActiveRun]:
        """End the engine's work under a stopping daemon. Call after the executor is closed
        (no task of these runs may still run), then `close`, which writes it all. Runs not
        started stay `queued` (they start afresh). A started run's open attempts end
        (RunGraph.halt); with `resumes` it is left `stopped`, its unfinished stages
        `pending`, and the next start resumes it (or, with `on_restart: fail` then, ends it
        `interrupted`); else it ends `interrupted` here, a final state like any other (its
        unfinished stages `cancelled`; its queue file goes once run.json is durable, through
        `on_finished`). Returns the started runs."""
        left = [run for run in self.runs.values() if run.record["state"] != "queued"]
        wall = self.clock.time()
        self.writes.forget()  # each started run's manifest is written below, once
        for run in left:
            if resumes:
                reason = "stopped with the daemon; runs again when the run resumes"
                state = "stopped"
                error = "the daemon stopped before the run ended; it resumes at next start"
            else:
                reason = "stopped with the daemon (on_restart: fail)"
                state, error = "interrupted", "the daemon stopped during the run (on_restart: fail)"
            run.graph.halt(reason, wall, resumes=resumes)
            # Handover: the manifest says no task runs, then run.json says why.
            self.writes.end(run, state, error, wall, finished=not resumes)
        self.runs.clear()
        self._check.clear()
        self._retrying.clear()
        self._waitlist.clear()
        self.tasks_held = 0
        self._running.clear()
        self.writes.flush()
        return left

    def close(self) -> bool:
        """Write what is pending and stop the writer thread (chute.engine.writes.Writes.close:
        a run whose final run.json is not written keeps its queue file, so it resumes at the
        next start). False when something was given up."""
        return self.writes.close()

    # -- queue and start -------------------------------------------------------------------

    def _enqueue(self, run: ActiveRun, unit: Unit, wall: float) -> None:
        stage = run.graph.stages[unit.stage]
        if stage.spec.cache and not unit.fallback and stage.cache is None:
            hit, failure = results.cache_hit(run, stage, wall, self.writes)
            if failure is not None:
                self._fail_run(run, failure)
            elif hit:
                self._check.add(run.run_id)  # its dependents may be ready now
                if self.events is not None:
                    self.events.cache_hit()
                self.writes.dirty(run)
        if unit.state != "waiting":
            return
        spec = stage.spec
        self._waitlist.add(
            run.run_id,
            run,
            priority=run.pipeline.priority,
            accepted=run.accepted,
            position=run.stage_index[spec.name],
            unit=unit,
            cpus=spec.cpus,
            memory=spec.memory,
            walltime=spec.timeout,
            since=wall,
        )

    def _start_ready(self, mono: float, wall: float) -> None:
        grants = self._running.grants()
        free, free_memory = free_of(self.topology, grants)
        if free == 0:
            return
        # Only the few units the allocator could start are handed to it (chute.engine.
        # waitlist): it then starts exactly what one walk of the whole queue would.
        picked = self._waitlist.candidates(
            free, free_memory, len(self.topology.cpus), self.topology.memory, self.policy
        )
        if not picked:
            return
        units = {req.key: (run, unit) for run, unit, req in picked}
        requests = [req for _, _, req in picked]
        for req, cores in allocator.allocate(requests, grants, self.topology, self.policy, mono):
            run, unit = units[req.key]
            if unit.state != "waiting":
                continue  # a start before it failed and ended its stage or run (failFast)
            grant = allocator.Grant(
                key=req.key, cores=cores, memory=req.memory, started=mono, walltime=req.walltime
            )
            if not self._start(run, unit, grant, wall):
                break  # the spool cannot be written: start nothing more for now
            self._waitlist.remove(run.run_id, run.stage_index[unit.stage], unit)

    def _start(self, run: ActiveRun, unit: Unit, grant: allocator.Grant, wall: float) -> bool:
        """Start `unit` on `grant`; False when its files could not be written for want of a
        writable spool (a full disk): the unit stays waiting and nothing is charged. A run
        folder that cannot be written for a reason of its own fails its run."""
        if unit.state != "waiting":
            return True  # its run failed earlier in this pass (_fail_run): drop it
        try:
            prepared = start.prepare(
                run,
                unit,
                grant,
                wall,
                stage_folder=self.writes.stage_folder,
                empty_inputs=self._empty_inputs_file,
            )
        except OSError as exc:
            if atomic.environment_wide(exc):
                self.writes.trouble(exc, f"preparing {unit.key}")
                return False
            self._fail_run(run, f"cannot write {exc.filename or run.dir}: {exc.strerror}")
            return True  # not started, and never will be: its run has failed
        run.graph.start(unit, grant.cores, wall)
        if run.record["state"] == "queued":
            if self.events is not None:
                self.events.run_started(run.accepted, wall)
            run.record["state"] = "running"
            run.record["started_at"] = rfc3339(wall)
            run.record_stale = True  # written with the manifest this start makes due
        self._running.hold(run, unit, grant)
        if prepared.made:
            self._running.made_for(unit.key, prepared.made)
        if prepared.problem is not None:
            self._apply(Result(key=unit.key, exit_code=None, error=prepared.problem))
            return True
        self.executor.start(prepared.task)
        self.writes.dirty(run)
        return True

    def _empty_inputs_file(self) -> Path:
        if self._empty_inputs is None:
            self._empty_inputs = start.empty_inputs_file(self.spool.state)
        return self._empty_inputs

    # -- results ---------------------------------------------------------------------------

    def _apply_all(self, delivered: list[Result]) -> None:
        if all(r.ok for r in delivered) and len(self._waitlist) and not self.draining:
            # Free these tasks' cores and start what waits for them first: its spawn then
            # overlaps the recording of these results (output.json, log line, manifest),
            # where it followed it. Only when all went well: a failure may cancel (failFast)
            # or retry what would start here. Their finish time is taken before those
            # starts, so that a core's intervals in the manifests never overlap.
            released = [(r, self._running.release(r.key)) for r in delivered]
            mono, wall = self.clock.monotonic(), self.clock.time()
            if not self.writes.paused(mono):
                self._start_ready(self.clock.monotonic(), self.clock.time())
            for result, (held, made) in released:
                self._apply_ended(result, held, made, mono, wall)
            return
        for result in delivered:
            self._apply(result)

    def _apply(self, result: Result) -> None:
        held, made = self._running.release(result.key)
        self._apply_ended(result, held, made, self.clock.monotonic(), self.clock.time())

    def _apply_ended(
        self, result: Result, held: Held | None, made: tuple[Path, ...], mono: float, wall: float
    ) -> None:
        """Record what `result` says; `made`: the folders the executor was to make for its
        task (Task.folders); `mono` and `wall`: when it was collected."""
        if held is None:
            log.debug("result for unknown task %s", result.key)
            return
        run, unit = held.run, held.unit
        if made and (result.ok or made[-1].is_dir()):  # a task that never started made none
            # Their names are synced with the task's output, like those of folders made here.
            self.writes.put_folders(f.parent for f in made)
            run.made.add(made[-1].parent)
        if result.no_room is not None:  # the task did not start: wait for room, then rerun
            err = OSError(result.no_room, os.strerror(result.no_room))
            self.writes.trouble(err, f"making the folders of {result.key}")
        out = results.collect(run, unit, result, wall, self.writes)
        graph = run.graph
        stage = graph.stages[unit.stage]
        self._check.add(run.run_id)
        was_final = stage.state in STAGE_FINAL
        for other in graph.finish(unit, out.result, mono, wall, out.data, out.output_hash):
            self.executor.cancel(other.key)
        # Durable here: a succeeded unit's done-mark is in place (not yet synced); that the
        # attempt ended is in memory only, so after a crash the unit runs again.
        crash_point("loop.attempt_recorded")
        if unit.state in ("failed", "timed_out"):  # failFast, or a shard's siblings skipped
            self._waitlist.prune(run.run_id)
        results.log_attempt(run, unit, out.result)
        mark = out.mark if unit.state == "succeeded" else None
        if mark is not None and out.result.done is not None:  # in place (Task.mark)
            self.writes.put_synced([out.folder / "output.json"])
        if stage.state in STAGE_FINAL:
            failure = results.stage_output(run, stage, wall, mark, self.writes)
            if failure is not None:
                self._fail_run(run, failure)
        if self.events is not None:
            if unit.state == "pending" and not out.result.lost:
                self.events.retry_scheduled()
            if not was_final and stage.state in STAGE_FINAL and stage.started_at is not None:
                self.events.stage_finished((stage.finished_at or wall) - stage.started_at)
        if unit.state == "pending" and unit.not_before > mono:
            self._retrying.add(run.run_id)
        self.writes.dirty(run, urgent=stage.state in STAGE_FINAL and stage.state not in STAGE_OK)
        self._end_if_done(run)

    # -- a run's end -----------------------------------------------------------------------

    def _end_if_done(self, run: ActiveRun) -> None:
        graph = run.graph
        if not graph.done or run.run_id not in self.runs:
            return
        if self._running.of(run):
            return
        del self.runs[run.run_id]
        self.tasks_held -= run.pipeline.tasks
        self.writes.end(run, graph.state, graph.error(), self.clock.time(), finished=True)

    def _fail_run(self, run: ActiveRun, reason: str) -> None:
        """Fail `run` as a whole for `reason`: a path of its folder cannot be written (gone,
        or replaced: that run's problem; a full disk pauses everything instead). Its tasks
        are stopped; its final run.json says why, if it can still be written."""
        if run.run_id not in self.runs or run.graph.aborted is not None:
            return
        log.warning("%s failed: %s", run.run_id, reason)
        for unit in run.graph.abort(reason, self.clock.time()):
            self.executor.cancel(unit.key)
        self._waitlist.prune(run.run_id)
        self._check.add(run.run_id)  # the next step finishes it once its tasks are gone
        self.writes.dirty(run, urgent=True)

    def _act_on_unwritten(self) -> None:
        """Act on what the writer thread could not write, for a reason of the path's own:
        an active run whose file it was fails (chute.engine.writes rewrites a finished
        run's end itself)."""
        for u in self.writes.lost():
            run_id = self.writes.run_of(u.path)
            run = self.runs.get(run_id) if run_id is not None else None
            if run is not None:
                self._fail_run(run, f"cannot write {u.cause}: {u.error.strerror}")
            elif run_id is None:  # a cache entry a task broke, or the spool's own folders
                log.warning("cannot write %s: %s; not written", u.path, u.error.strerror)


def _sooner(a: float | None, b: float | None) -> float | None:
    """The earlier of two waits (None: no limit)."""
    return b if a is None else a if b is None else min(a, b)
