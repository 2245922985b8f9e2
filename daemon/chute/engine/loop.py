"""The engine loop: ready units of every active run, through the allocator, to the executor.

Owns: the cores each running task holds, turning a unit into a Task (folders,
environment, inputs), turning a Result into output files, when run.json and
manifest.json are written, and the report of why units wait (`waiting`, once a second;
its words: chute.engine.reasons). Not here: stage states (chute.engine.dag), the units waiting for
CPUs and which of them the allocator sees (chute.engine.waitlist), processes
(chute.execution.local), which cores (chute.scheduling.allocator).
Crash safety: all writes of one loop step go out in one group commit (chute.store.writer), a
unit's output.json before the manifest that points at it, and a run's final manifest
before its final run.json. A stage's output.json is its idempotent "done" mark: it is
written once, after the task ended, so a crash leaves the stage done or not run (a call:
task's worker writes its own, Task.mark, and the engine syncs it like one of its own; a
first attempt's folders are made by the executor, Task.folders, and synced with it).
The manifest of a running run is rewritten at most every MANIFEST_INTERVAL seconds (longer
for a manifest that takes long to make: MANIFEST_SHARE), and at once when a stage fails or
the run ends; run.json turns `running` with the first of those
(a run shorter than that is written queued, then final: two run.json writes, not three).
A crash before it leaves the run `queued` with stage folders: recovery counts it started.
A cache entry (chute.engine.cache) lands in the same group commit as its stage's done-mark,
its files first and its entry.json last, before the run's final run.json. A stopping daemon
(`interrupt`) ends the open attempts of the runs it leaves, so their manifests never say
a task runs that does not.
Diagnostics: a task's own failure is recorded in the manifest. A run folder is hostile
input (its tasks may remove or replace anything in it), so a write that fails is scoped by
its errno (atomic.environment_wide): no room, a read-only or failing filesystem pauses
every start until a probe write succeeds (one ERROR line); anything else is that run's
problem. A task's own files that cannot be used (its log, CHUTE_INPUTS, its done-mark, its
artifacts) fail its attempt with the reason; any other path of the run (its manifest, a
stage folder) fails the run, whose run.json says which path and why, and a run whose end
cannot be recorded at all is dropped with one ERROR line (_rewrite_final).
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from chute.clock import Clock, parse_rfc3339, rfc3339
from chute.engine import cache, reasons
from chute.engine.dag import STAGE_FINAL, STAGE_OK, RunGraph, StageRun, Unit
from chute.engine.waitlist import Waitlist
from chute.execution import runner
from chute.execution.executor import Context, Executor, Mark, Result, Task
from chute.faults import crash_point
from chute.scheduling import allocator
from chute.scheduling.topology import Topology, format_cpulist
from chute.spec.model import Pipeline
from chute.store import atomic, groupcommit, writer
from chute.store.outputs import data_hash, digest, document, relocate, scan_artifacts
from chute.store.spool import Spool

log = logging.getLogger(__name__)

MANIFEST_INTERVAL = 0.5
CLOSE_LIMIT = 5.0  # seconds `close` waits for writes that keep failing (a full disk)
MANIFEST_SHARE = 0.1
"""A running run's manifest waits between rewrites at least MANIFEST_INTERVAL, and at least
its last one's making time / MANIFEST_SHARE: a big run's manifest takes at most this share
of the loop, however big it is."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EMPTY_INPUTS = b'{"inputs":{},"upstream":{}}\n'


@dataclass(slots=True, eq=False)
class ActiveRun:
    """A run the engine is driving."""

    run_id: str
    pipeline: Pipeline
    graph: RunGraph
    dir: Path
    record: dict[str, Any]
    accepted: float  # epoch seconds: when its file was accepted (orders the queue)
    # Per-run state of the loop, dropped with the run (a daemon lives for months):
    stage_index: dict[str, int] = field(default_factory=dict)  # topological position
    made: set[Path] = field(default_factory=set)  # stage folders known to exist
    record_stale: bool = False  # `record` changed since run.json was last written
    rewritten: bool = False  # its final run.json was written again after a failed write
    manifest_cost: float = 0.0  # seconds its last manifest took to make (sets the next wait)

    @property
    def state(self) -> str:
        return str(self.record["state"])


class EngineEvents(Protocol):
    """What the engine reports as it happens (chute.observe.metrics.Metrics is one); plain calls,
    on the loop's thread, so the engine needs no metrics library."""

    def run_started(self, accepted: float, wall: float) -> None: ...
    def stage_finished(self, seconds: float) -> None: ...
    def retry_scheduled(self) -> None: ...
    def cache_hit(self) -> None: ...


def base_env() -> dict[str, str]:
    """The clean environment every task starts from: PATH, HOME, LANG, TZ of the daemon."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ") if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    return env


def resolve_input(ref: str, upstream: dict[str, Any]) -> Any:
    """The value `stage.a.b` names in the upstream outputs; KeyError says what is there."""
    stage, _, path = ref.partition(".")
    value = upstream.get(stage)
    walked = stage
    for part in path.split(".") if path else []:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            if isinstance(value, dict):
                have = f"fields: {', '.join(map(str, value)) or 'none'}"
            elif isinstance(value, list):
                have = f"a list of {len(value)}"
            else:
                have = f"its value is {orjson.dumps(value).decode()[:60]}"
            raise KeyError(f"{walked} has no {part!r} ({have})")
        walked += f".{part}"
    return value


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
        """`syncfs`: filesystems to sync whole per group commit (groupcommit.own_filesystems).
        `wake`: makes the loop step soon; the writer thread calls it when it hands the loop
        something (a file it could not write, a finished run whose end did not land)."""
        self.spool = spool
        self.executor = executor
        self.topology = topology
        self.policy = policy
        self.clock = clock or Clock()
        self.on_finished = on_finished
        self.events = events
        self.runs: dict[str, ActiveRun] = {}
        self._wake = wake
        self._inbox: list[Result] = []  # delivered since the last step
        self._check: set[str] = set()  # runs to look at in the next step
        self._retrying: set[str] = set()  # runs with a unit waiting out a retry delay
        self._due: dict[str, float] = {}  # run id -> when its manifest must be written
        self._waitlist: Waitlist[ActiveRun] = Waitlist()  # units waiting for CPUs
        self.tasks_held = 0  # tasks of the active runs (Pipeline.tasks), for backpressure
        self._running: dict[str, tuple[ActiveRun, Unit, allocator.Grant]] = {}
        self._writes: list[tuple[Path, bytes]] = []
        self._synced: list[Path] = []  # in place already, to fsync with the next commit
        self._new_dirs: set[Path] = set()
        self._left_folders: dict[str, tuple[Path, ...]] = {}  # task key -> Task.folders
        self._runs_parts = spool.runs.parts
        # Filled by the writer thread: paths it could not write (on_unwritten), and runs
        # whose final files were among them (the finishing callback).
        self._unwritten: deque[groupcommit.Unwritten] = deque()
        self._refinish: deque[tuple[ActiveRun, groupcommit.Unwritten]] = deque()
        self._committer = writer.Committer(
            syncfs=syncfs, scope=self._run_of, on_unwritten=self._on_unwritten
        )
        self.draining = False  # stopping: start nothing new, let running tasks end
        self.disk_error: OSError | None = None  # set while the spool cannot be written
        self._next_probe = 0.0
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
        self._dirty(run, urgent=True)
        self._maybe_finish(run)
        return True

    @property
    def cores_in_use(self) -> int:
        return sum(len(g.cores) for _, _, g in self._running.values())

    def cores_by_node(self) -> dict[int, int]:
        """Cores held by running tasks, by NUMA node."""
        out: dict[int, int] = {}
        for _, _, g in self._running.values():
            for core in g.cores:
                try:
                    node = self.topology.node_of(core)
                except ValueError:  # a core a config reload took away, until its task ends
                    continue
                out[node] = out.get(node, 0) + 1
        return out

    def waiting_beyond(self, topology: Topology) -> list[str]:
        """Keys of waiting tasks that ask for more cpus or memory than `topology` has."""
        return self._waitlist.beyond(len(topology.cpus), topology.memory)

    @property
    def tasks_running(self) -> int:
        return len(self._running)

    @property
    def tasks_waiting(self) -> int:
        return len(self._waitlist)

    def waiting(self) -> reasons.Waiting:
        """Why the units that have not started wait, run by run in queue order: the
        allocator's reasons for the units it would see now (a decision made, and not acted
        on), a retry's delay, a paused engine. For the status, once a second."""
        now, wall = self.clock.monotonic(), self.clock.time()
        grants = [g for _, _, g in self._running.values()]
        busy = {core for g in grants for core in g.cores}
        free = sum(1 for core in self.topology.cpus if core not in busy)
        free_memory = self.topology.memory - sum(g.memory for g in grants)
        whole, whole_memory = len(self.topology.cpus), self.topology.memory
        why: dict[str, str] = {}
        starts: list[tuple[allocator.Request, tuple[int, ...]]] = []
        if len(self._waitlist) and free:
            picked = self._waitlist.candidates(free, free_memory, whole, whole_memory, self.policy)
            requests = [req for _, _, req in picked]
            starts = allocator.allocate(requests, grants, self.topology, self.policy, now, why)
        paused = (
            reasons.STOPPING
            if self.draining
            else reasons.DISK
            if self.write_error is not None
            else None
        )
        report = reasons.Waiting(free=free, free_memory=free_memory)
        by_run: dict[str, list[reasons.StageWait]] = {}
        for g in self._waitlist.explain(
            why, {r.key for r, _ in starts}, free, free_memory, whole, whole_memory
        ):
            reason = paused or g.reason
            report.tasks[reason] += g.units
            stage = g.owner.pipeline.stages[g.position]
            wait = reasons.StageWait(stage.name, reason, g.since, g.units, g.cpus, g.memory)
            if g.run_id not in by_run:
                by_run[g.run_id] = []
                report.runs.append(reasons.RunWait(g.run_id, reason, g.since, g.rank))
            by_run[g.run_id].append(wait)
        for run_id in sorted(self._retrying):
            run = self.runs.get(run_id)
            if run is None:
                continue
            for t, unit in sorted(run.graph.delayed(), key=lambda e: e[0]):
                report.retrying += 1
                last = unit.attempts[-1] if unit.attempts else None
                since = last.finished_at if last is not None and last.finished_at else wall
                spec = run.graph.stages[unit.stage].spec
                wait = reasons.StageWait(
                    unit.stage, reasons.RETRY, since, 1, spec.cpus, spec.memory, wall + t - now
                )
                if run_id not in by_run:
                    by_run[run_id] = []
                    report.runs.append(reasons.RunWait(run_id, reasons.RETRY, since, None))
                by_run[run_id].append(wait)
        for r in report.runs:
            r.stages = reasons.merged(by_run[r.run_id])
            if len(r.stages) > 1:
                r.since = min(s.since for s in r.stages)
        return report

    def step(self) -> float | None:
        """Queue what became ready, start what fits, write what changed.

        Returns the seconds until the engine must step again without a result (None: only
        a result or a new run can change anything).
        """
        if self._inbox:
            results, self._inbox = self._inbox, []
            self._handle_results(results)
        now = self.clock.monotonic()
        wall = self.clock.time()
        self._take_unwritten()
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
            elif t <= now:
                check.add(run_id)
            else:
                retry_wake = t if retry_wake is None else min(retry_wake, t)
        for run_id in check:
            run = self.runs.get(run_id)
            if run is None:
                continue
            for unit in run.graph.take_ready(now):
                self._enqueue(run, unit, wall)
            self._maybe_finish(run)
        paused = self._disk_paused(now)  # probes even when nothing waits, to clear the error
        if len(self._waitlist) and not self.draining and not paused:
            self._start_ready(now, wall)
        self._flush(now)
        if self._check:
            return 0.0  # this step made more ready (a cache hit): look again at once
        if self.disk_error is not None:
            retry_wake = now + 1.0 if retry_wake is None else min(retry_wake, now + 1.0)
        wake = min(self._due.values(), default=None)
        if retry_wake is not None:
            wake = retry_wake if wake is None else min(wake, retry_wake)
        return None if wake is None else max(0.0, wake - self.clock.monotonic())

    def use_syncfs(self, roots: Sequence[Path]) -> None:
        """Sync group commits with syncfs(2) on `roots` ([]: fsync per file) from now on."""
        self._committer.use_syncfs(roots)

    def sync_then(self, unsynced: atomic.Unsynced, on_done: Callable[[], None]) -> None:
        """Make `unsynced` durable in the writer thread, in order with the engine's writes,
        then call `on_done` there (the daemon's intake hands runs over this way)."""
        self._committer.submit((), unsynced.folders, on_done, unsynced.files)

    def deliver(self, result: Result) -> None:
        """A task ended (the executor's on_result): recorded at the next step, with the
        others that ended meanwhile."""
        self._inbox.append(result)

    def _handle_results(self, results: list[Result]) -> None:
        if all(r.ok for r in results) and len(self._waitlist) and not self.draining:
            # Free these tasks' cores and start what waits for them first: its spawn then
            # overlaps the recording of these results (output.json, log line, manifest),
            # where it followed it. Only when all went well: a failure may cancel (failFast)
            # or retry what would start here. Their finish time is taken before those
            # starts, so that a core's intervals in the manifests never overlap.
            entries = [(r, self._running.pop(r.key, None)) for r in results]
            now, wall = self.clock.monotonic(), self.clock.time()
            if not self._disk_paused(now):
                self._start_ready(self.clock.monotonic(), self.clock.time())
            for result, entry in entries:
                self._record(result, entry, now, wall)
            return
        for result in results:
            self._handle(result)

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
        self._flush(self.clock.monotonic())
        while True:  # a final run.json that could not be written is written once more
            self._committer.flush()
            if not self._unwritten and not self._refinish:
                break
            self._take_unwritten()
            self._flush(self.clock.monotonic())

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
        self._due.clear()  # each started run's manifest is written below, once
        for run in left:
            rec = run.record
            if resumes:
                reason = "stopped with the daemon; runs again when the run resumes"
                rec["state"] = "stopped"
                rec["error"] = "the daemon stopped before the run ended; it resumes at next start"
            else:
                reason = "stopped with the daemon (on_restart: fail)"
                rec["state"] = "interrupted"
                rec["error"] = "the daemon stopped during the run (on_restart: fail)"
                rec["finished_at"] = rfc3339(wall)
                started = rec.get("started_at") or rec.get("created_at")
                if started:
                    rec["duration_seconds"] = round(wall - parse_rfc3339(started).timestamp(), 6)
            run.graph.halt(reason, wall, resumes=resumes)
            # Handover: the manifest says no task runs, then run.json says why.
            self._writes.append((run.dir / "manifest.json", self._manifest(run)))
            self._writes.append((run.dir / "run.json", atomic.dumps(rec)))
            if not resumes:
                self._flush(self.clock.monotonic(), on_done=self._finished_callback(run))
        self.runs.clear()
        self._due.clear()
        self._check.clear()
        self._retrying.clear()
        self._waitlist.clear()
        self.tasks_held = 0
        self._running.clear()
        self._left_folders.clear()
        self._flush(self.clock.monotonic())
        return left

    def close(self, timeout: float = CLOSE_LIMIT) -> bool:
        """Write what is pending and stop the writer thread, giving up after `timeout`
        seconds of failing writes (one ERROR line says what was not written; a run whose
        final run.json is among it keeps its queue file, so it resumes at the next start).
        False when something was given up."""
        self._flush(self.clock.monotonic())
        landed = self._committer.close(timeout)
        for u in self._unwritten:
            log.error("cannot write %s: %s; not written", u.path, u.error.strerror)
        self._unwritten.clear()
        return landed

    # -- queue and start -------------------------------------------------------------------

    def _enqueue(self, run: ActiveRun, unit: Unit, wall: float) -> None:
        stage = run.graph.stages[unit.stage]
        if stage.spec.cache and not unit.fallback and stage.cache is None:
            self._consult_cache(run, stage, wall)
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

    def _consult_cache(self, run: ActiveRun, stage: StageRun, wall: float) -> None:
        """A hit puts the entry's files in the stage's folder and its output, paths moved
        to this run (outputs.relocate), as the stage's done-mark: the run then needs no
        other run's folder. An entry that cannot be used is a miss: the stage runs."""
        upstream = {d: run.graph.stages[d].output_hash or "" for d in stage.spec.depends_on}
        key = cache.cache_key(stage.spec, upstream)
        stage.cache = {"key": key, "hit": False}
        cache.touch(self.spool.cache, key)  # before the read: retention leaves it alone now
        try:
            entry = cache.lookup(self.spool.cache, key)
        except cache.Unusable as why:
            log.warning("%s cache entry %s %s; running the stage", run.run_id, key, why)
            return
        if entry is None:
            return
        try:
            sdir = self._stage_folder(run, stage.name, None)
            self._new_dirs.update(cache.place(entry, sdir))
        except OSError as exc:
            if atomic.environment_wide(exc):  # the stage runs instead, once there is room
                self._disk_trouble(exc, f"making the folder of {stage.name}")
            elif exc.filename is not None and str(exc.filename).startswith(str(entry.folder)):
                log.warning(
                    "%s cache entry %s cannot be used (%s: %s); running the stage",
                    run.run_id,
                    key,
                    exc.filename,
                    exc.strerror,
                )
            else:
                self._fail_run(run, f"cannot write {exc.filename}: {exc.strerror}")
            return
        data = relocate(entry.doc["data"], entry.origins, str(run.dir))
        if not self._put_mark(run, sdir / "output.json", atomic.dumps({**entry.doc, "data": data})):
            return
        # The hit keeps the entry's output_hash (what its dependents' cache keys are made
        # of), though its paths now name this run's files.
        run.graph.cache_hit(stage.name, data, entry.output_hash, wall)
        self._check.add(run.run_id)  # its dependents may be ready now
        if self.events is not None:
            self.events.cache_hit()
        log.info("%s stage %s finished state=cached key=%s", run.run_id, stage.name, key[:12])
        self._dirty(run)

    def _start_ready(self, now: float, wall: float) -> None:
        grants = [g for _, _, g in self._running.values()]
        busy = {core for g in grants for core in g.cores}
        free = sum(1 for core in self.topology.cpus if core not in busy)
        if free == 0:
            return
        # Only the few units the allocator could start are handed to it (chute.engine.
        # waitlist): it then starts exactly what one walk of the whole queue would.
        picked = self._waitlist.candidates(
            free,
            self.topology.memory - sum(g.memory for g in grants),
            len(self.topology.cpus),
            self.topology.memory,
            self.policy,
        )
        if not picked:
            return
        units = {req.key: (run, unit) for run, unit, req in picked}
        requests = [req for _, _, req in picked]
        for req, cores in allocator.allocate(requests, grants, self.topology, self.policy, now):
            run, unit = units[req.key]
            if unit.state != "waiting":
                continue  # a start before it failed and ended its stage or run (failFast)
            grant = allocator.Grant(
                key=req.key, cores=cores, memory=req.memory, started=now, walltime=req.walltime
            )
            if not self._start(run, unit, grant, wall):
                break  # the spool cannot be written: start nothing more for now
            self._waitlist.remove(run.run_id, run.stage_index[unit.stage], unit)

    def _stage_folder(self, run: ActiveRun, stage: str, shard: int | None) -> Path:
        """The unit's folder, made (with its artifacts/) if it was not yet."""
        folder, made = _folders(run, stage, shard)
        if folder not in run.made:
            for f in made:
                try:
                    os.mkdir(f)
                    self._new_dirs.add(f.parent)
                except FileExistsError:
                    pass
            run.made.add(folder)
        return folder

    def _take_folders(self, run: ActiveRun, result: Result) -> None:
        """Take over the folders the executor made for a task (Task.folders): their names
        are synced with the task's output, like those of folders made here."""
        made = self._left_folders.pop(result.key, ())
        if made and (result.ok or made[-1].is_dir()):  # a task that never started made none
            self._new_dirs.update(f.parent for f in made)
            run.made.add(made[-1].parent)

    def _start(self, run: ActiveRun, unit: Unit, grant: allocator.Grant, wall: float) -> bool:
        """Start `unit` on `grant`; False when its files could not be written for want of a
        writable spool (a full disk): the unit stays waiting and nothing is charged. A run
        folder that cannot be written for a reason of its own fails its run."""
        if unit.state != "waiting":
            return True  # its run failed earlier in this pass (_fail_run): drop it
        try:
            return self._try_start(run, unit, grant, wall)
        except OSError as exc:
            if atomic.environment_wide(exc):
                self._disk_trouble(exc, f"preparing {unit.key}")
                return False
            self._fail_run(run, f"cannot write {exc.filename or run.dir}: {exc.strerror}")
            return True  # not started, and never will be: its run has failed

    def _try_start(self, run: ActiveRun, unit: Unit, grant: allocator.Grant, wall: float) -> bool:
        graph = run.graph
        stage = graph.stages[unit.stage]
        spec = stage.spec
        attempt_no = unit.attempts_total + 1
        # A first attempt that needs no file in its folder beforehand has the folder made by
        # the executor (the spawner thread, the call worker): two fewer file-system creates
        # on the loop per task, each ~0.2 ms here while the writer thread syncs.
        problem: str | None = None  # why this attempt fails before it starts
        if attempt_no == 1 and not unit.fallback and not spec.depends_on:
            folder, made = _folders(run, spec.name, unit.shard)
        else:
            folder, made = _folders(run, spec.name, unit.shard)[0], ()
            try:
                self._stage_folder(run, spec.name, unit.shard)
            except OSError as exc:  # the unit's own folders: a task replaced one (a FIFO)
                if atomic.environment_wide(exc):
                    raise
                problem = f"cannot make folder {exc.filename}: {exc.strerror}"
        fb = spec.fallback if unit.fallback else None
        run_cmd = fb.run if fb is not None else spec.run
        call = fb.call if fb is not None else spec.call
        kwargs: dict[str, Any] = dict(fb.with_ if fb is not None else spec.with_)

        upstream = graph.upstream_data(spec)
        inputs: dict[str, Any] = {}
        for kwarg, ref in spec.inputs.items():
            try:
                inputs[kwarg] = resolve_input(ref, upstream)
            except KeyError as exc:
                problem = problem or f"inputs.{kwarg}: {exc.args[0]}"
        inputs_blob = (
            orjson.dumps({"inputs": inputs, "upstream": upstream}) if spec.depends_on else None
        )
        unit.input_hash = digest(inputs_blob or EMPTY_INPUTS)
        if inputs_blob is None:
            inputs_path = self._empty_inputs_file()
        else:
            inputs_path = folder / ".inputs.json"
            try:  # derived data, rebuilt on every attempt; replaces whatever a task put there
                atomic.write_volatile(inputs_path, inputs_blob)
            except OSError as exc:
                if atomic.environment_wide(exc):
                    raise
                problem = problem or f"cannot write CHUTE_INPUTS {inputs_path}: {exc.strerror}"

        count = spec.shards.count if spec.shards is not None else 1
        index = unit.shard if unit.shard is not None else 0
        item: Any = None
        if spec.shards is not None and spec.shards.items is not None and unit.shard is not None:
            item = spec.shards.items[unit.shard]
        chute_env = {
            "CHUTE_RUN_ID": run.run_id,
            "CHUTE_RUN_DIR": str(run.dir),
            "CHUTE_RUN_DATE": str(run.record.get("run_date", "")),
            "CHUTE_STAGE": spec.name,
            "CHUTE_ARTIFACTS": str(folder / "artifacts"),
            "CHUTE_INPUTS": str(inputs_path),
            "CHUTE_OUTPUT": str(folder / ".output.json"),
            "CHUTE_SHARD_INDEX": str(index),
            "CHUTE_SHARD_COUNT": str(count),
            "CHUTE_CPUS": str(len(grant.cores)),
            "CHUTE_CPU_LIST": format_cpulist(grant.cores),
        }
        if item is not None:
            chute_env["CHUTE_SHARD_ITEM"] = (
                item if isinstance(item, str) else orjson.dumps(item).decode()
            )
        env = (
            {**base_env(), **spec.env, **chute_env}
            if run_cmd is not None
            else {
                **spec.env,
                **chute_env,
            }
        )
        log_path = folder / "log"  # a fallback's folder is its stage's
        if (attempt_no > 1 or unit.fallback) and problem is None:
            what = "fallback" if unit.fallback else f"attempt {attempt_no}"
            problem = _log_header(log_path, f"--- chute: {what} at {rfc3339(wall)} ---\n")
        graph.start(unit, grant.cores, wall)
        key = unit.key
        mark = None
        if call is not None and not unit.fallback:
            # The worker writes the done-mark itself when the call succeeds: one file
            # fewer for the loop to create per stage; it is synced here, as ours would be.
            mark = Mark(
                path=str(folder / "output.json"),
                run_dir=str(run.dir),
                stage=spec.name,
                version=spec.version,
                input_hash=unit.input_hash,
                started_at=wall,
            )
        task = Task(
            key=key,
            kind="run" if run_cmd is not None else "call",
            cores=grant.cores,
            log_path=str(log_path),
            output_path=chute_env["CHUTE_OUTPUT"],
            env=env,
            cwd=spec.workdir or str(folder),
            timeout=spec.timeout,
            folders=tuple(map(str, made)),
            mark=mark,
            command=run_cmd,
            call=call,
            kwargs={**kwargs, **inputs},
            context=Context(
                run_id=run.run_id,
                stage=spec.name,
                artifacts=chute_env["CHUTE_ARTIFACTS"],
                shard_index=index,
                shard_count=count,
                shard_item=item,
                cores=grant.cores,
            ),
        )
        if run.record["state"] == "queued":
            if self.events is not None:
                self.events.run_started(run.accepted, wall)
            run.record["state"] = "running"
            run.record["started_at"] = rfc3339(wall)
            run.record_stale = True  # written with the manifest this start makes due
        self._running[key] = (run, unit, grant)
        if made:
            self._left_folders[key] = made
        if problem is not None:
            self._handle(Result(key=key, exit_code=None, error=problem))
            return True
        self.executor.start(task)
        self._dirty(run)
        return True

    @property
    def write_error(self) -> OSError | None:
        """Why the spool cannot be written now (a full disk), or None."""
        return self.disk_error or self._committer.error

    def _disk_trouble(self, exc: OSError, what: str) -> None:
        if self.disk_error is None:
            log.error(
                "cannot write the spool (%s: %s, errno %s); starting no task until it can: "
                "free space or fix permissions under %s",
                what,
                exc.strerror,
                exc.errno,
                self.spool.root,
            )
        self.disk_error = exc

    def _disk_paused(self, now: float) -> bool:
        """True while the spool cannot be written; probes it once a second."""
        if self.disk_error is None and self._committer.error is None:
            return False
        if now < self._next_probe:
            return True
        self._next_probe = now + 1.0
        probe = self.spool.state / ".space-probe"
        try:
            atomic.write_volatile(probe, b"\0" * 65536)
            os.unlink(probe)
        except OSError:
            return True
        if self._committer.error is not None:
            return True
        if self.disk_error is not None:
            log.warning("the spool is writable again; starting tasks")
            self.disk_error = None
        return False

    def _empty_inputs_file(self) -> Path:
        if self._empty_inputs is None:
            path = self.spool.state / "empty-inputs.json"
            if not path.exists():
                atomic.write_bytes(path, EMPTY_INPUTS)
            self._empty_inputs = path
        return self._empty_inputs

    # -- results ---------------------------------------------------------------------------

    def _handle(self, result: Result) -> None:
        entry = self._running.pop(result.key, None)
        self._record(result, entry, self.clock.monotonic(), self.clock.time())

    def _record(
        self,
        result: Result,
        entry: tuple[ActiveRun, Unit, allocator.Grant] | None,
        now: float,
        wall: float,
    ) -> None:
        """Record what `result` says; `now` and `wall`: when it was collected."""
        if entry is None:
            log.debug("result for unknown task %s", result.key)
            return
        run, unit, _ = entry
        self._take_folders(run, result)
        if result.no_room is not None:  # the task did not start: wait for room, then rerun
            err = OSError(result.no_room, os.strerror(result.no_room))
            self._disk_trouble(err, f"making the folders of {result.key}")
        data: Any = None
        output_hash: str | None = None
        listing: list[dict[str, str]] = []
        blob: bytes | None = result.done
        graph = run.graph
        stage = graph.stages[unit.stage]
        folder = _folders(run, unit.stage, None if unit.fallback else unit.shard)[0]
        if result.ok and result.done is None:
            listing, problem = scan_artifacts(folder / "artifacts", folder, run.dir)
            if problem is not None:
                result = Result(key=result.key, exit_code=result.exit_code, error=problem)
        if result.ok:
            try:
                data = orjson.loads(result.output) if result.output else None
            except orjson.JSONDecodeError as exc:
                result = Result(
                    key=result.key, exit_code=result.exit_code, error=f"output is not JSON: {exc}"
                )
            else:
                output_hash = result.output_hash or data_hash(data)
        if result.ok and result.done is None:
            # Handover: this output.json is the unit's done-mark. It is in place before any
            # dependent starts (a restart after the daemon dies never runs it again) and
            # durable before the next manifest that names it (the committer syncs it
            # first). Written before the attempt is recorded: a task that left something
            # in its place (a folder) fails its own attempt.
            blob = document(
                stage=stage.spec.name,
                version=stage.spec.version,
                created_at=wall,
                started_at=unit.started_at,
                input_hash=unit.input_hash,
                data=data,
                artifacts=listing,
                output_hash=output_hash,
            )
            error = self._write_mark(folder / "output.json", blob)
            if error is not None:
                error = f"cannot write the done-mark {folder / 'output.json'}: {error}"
                result = Result(key=result.key, exit_code=result.exit_code, error=error)
        elif not result.ok and stage.spec.call is not None and not unit.fallback:
            # A call stopped after its worker left the done-mark (Task.mark): not done.
            try:
                os.unlink(folder / "output.json")
            except OSError as exc:  # none, or a task's folder: the stage is not done either way
                log.debug("%s: %s", folder / "output.json", exc.strerror)
        self._check.add(run.run_id)
        was_final = stage.state in STAGE_FINAL
        for other in graph.finish(unit, result, now, wall, data, output_hash):
            self.executor.cancel(other.key)
        # Durable here: a succeeded unit's done-mark is in place (not yet synced); that the
        # attempt ended is in memory only, so after a crash the unit runs again.
        crash_point("loop.attempt_recorded")
        if unit.state in ("failed", "timed_out"):  # failFast, or a shard's siblings skipped
            self._waitlist.prune(run.run_id)
        self._log_unit(run, unit, result)
        if unit.state != "succeeded":
            blob = None
        elif result.done is not None:  # in place (Task.mark): to be made durable
            self._synced.append(folder / "output.json")
        if stage.state in STAGE_FINAL:
            self._stage_finished(run, stage, wall, blob)
        if self.events is not None:
            if unit.state == "pending" and not result.lost:
                self.events.retry_scheduled()
            if not was_final and stage.state in STAGE_FINAL and stage.started_at is not None:
                self.events.stage_finished((stage.finished_at or wall) - stage.started_at)
        if unit.state == "pending" and unit.not_before > now:
            self._retrying.add(run.run_id)
        self._dirty(run, urgent=stage.state in STAGE_FINAL and stage.state not in STAGE_OK)
        self._maybe_finish(run)

    def _log_unit(self, run: ActiveRun, unit: Unit, result: Result) -> None:
        a = unit.attempts[-1] if unit.attempts else None
        name = unit.stage if unit.shard is None else f"{unit.stage}[{unit.shard}]"
        if unit.fallback:
            name += " fallback"
        level = logging.INFO if result.ok or unit.state == "pending" else logging.WARNING
        if a is None:
            return
        dur = (a.finished_at or 0.0) - a.started_at
        max_attempts = run.graph.stages[unit.stage].spec.retries.max + 1
        log.log(
            level,
            "%s stage %s finished state=%s exit_code=%s attempt=%d/%d duration=%.3fs%s",
            run.run_id,
            name,
            "retrying" if unit.state == "pending" else unit.state,
            a.exit_code,
            a.attempt,
            max_attempts,
            dur,
            f" error={a.error!r}" if a.error else "",
        )

    def _write_mark(self, path: Path, blob: bytes) -> str | None:
        """Put the done-mark `blob` in place at `path` (made durable with the next commit);
        the errno text when `path` cannot take it for a reason of its own (the run's
        problem: a folder there, its folder gone). For want of a writable spool the
        committer holds the mark and retries until it lands."""
        try:
            atomic.write_volatile(path, blob)
        except OSError as exc:
            if not atomic.environment_wide(exc):
                return exc.strerror or str(exc)
            self._disk_trouble(exc, f"writing {path}")
            self._writes.append((path, blob))
            return None
        self._synced.append(path)
        return None

    def _put_mark(self, run: ActiveRun, path: Path, blob: bytes) -> bool:
        """_write_mark of a mark no attempt is left to fail for (a cache hit, a sharded
        stage's): a path that cannot take it fails the run. False then."""
        error = self._write_mark(path, blob)
        if error is not None:
            self._fail_run(run, f"cannot write {path}: {error}")
        return error is None

    def _stage_finished(
        self, run: ActiveRun, stage: StageRun, wall: float, blob: bytes | None
    ) -> None:
        """Gather a sharded stage's output; keep a cacheable stage's output in cache/."""
        spec = stage.spec
        if stage.state != "succeeded":
            return
        if spec.shards is not None:
            try:
                folder = self._stage_folder(run, spec.name, None)
            except OSError as exc:
                if not atomic.environment_wide(exc):
                    self._fail_run(run, f"cannot write {exc.filename}: {exc.strerror}")
                    return
                folder = _folders(run, spec.name, None)[0]  # the mark waits for room
            blob = document(
                stage=spec.name,
                version=spec.version,
                created_at=wall,
                started_at=None,
                input_hash=None,
                data=stage.data,
                artifacts=_shard_artifacts(run.run_id, folder, run.dir),
            )
            stage.output_hash = data_hash(stage.data)
            if not self._put_mark(run, folder / "output.json", blob):
                return
        if spec.cache and stage.cache is not None and blob is not None:
            key = stage.cache["key"]
            try:  # the entry owns the stage's files: no later run needs this run's folder
                folder = _folders(run, spec.name, None)[0]
                kept = cache.keep(self.spool.cache, key, blob, folder, run.dir)
            except OSError as exc:  # a task can reach cache/; a cache entry is a nicety
                log.warning(
                    "cache entry %s not kept: %s%s",
                    self.spool.cache / key,
                    f"{exc.filename}: " if exc.filename else "",
                    exc.strerror,
                )
                return
            cache.touch(self.spool.cache, stage.cache["key"])  # kept while the write waits
            # Handover: its files' contents and names are synced in the group commit before
            # entry.json, the entry's commit point, which lands before the run's final
            # run.json: a run dropped once this one has ended finds the entry.
            self._synced.extend(kept.links)
            self._new_dirs.update(kept.folders)
            self._writes.append(kept.write)

    # -- run records -----------------------------------------------------------------------

    def _dirty(self, run: ActiveRun, urgent: bool = False) -> None:
        now = self.clock.monotonic()
        due = now if urgent else now + max(MANIFEST_INTERVAL, run.manifest_cost / MANIFEST_SHARE)
        if due < self._due.get(run.run_id, math.inf):
            self._due[run.run_id] = due

    def _manifest(self, run: ActiveRun) -> bytes:
        began = time.perf_counter()  # the loop's own time, whatever the Clock says
        blob = atomic.dumps(
            {"run_id": run.run_id, "pipeline": run.pipeline.name, "stages": run.graph.manifest()}
        )
        run.manifest_cost = time.perf_counter() - began
        return blob

    def _maybe_finish(self, run: ActiveRun) -> None:
        graph = run.graph
        if not graph.done or run.run_id not in self.runs:
            return
        if any(r is run for r, _, _ in self._running.values()):
            return
        wall = self.clock.time()
        rec = run.record
        rec["state"] = graph.state
        rec["finished_at"] = rfc3339(wall)
        started = rec.get("started_at") or rec.get("created_at")
        if started:
            rec["duration_seconds"] = round(wall - parse_rfc3339(started).timestamp(), 6)
        rec["error"] = _run_error(graph)
        # Handover: the final manifest, then the final run.json that says the run is over.
        self._writes.append((run.dir / "manifest.json", self._manifest(run)))
        self._writes.append((run.dir / "run.json", atomic.dumps(rec)))
        self._due.pop(run.run_id, None)
        del self.runs[run.run_id]
        self.tasks_held -= run.pipeline.tasks
        self._flush(self.clock.monotonic(), on_done=self._finished_callback(run))

    def _finished_callback(self, run: ActiveRun) -> Callable[[], None]:
        hook = self.on_finished

        def finished() -> None:  # in the writer thread, after the run's final batch
            lost = self._committer.unwritten_scopes.get(run.run_id)
            if lost is not None:  # its end is not on disk: the loop decides (_rewrite_final)
                self._refinish.append((run, lost))
                self._wake()
            elif hook is not None:
                hook(run)

        return finished

    # -- what could not be written -----------------------------------------------------------

    def _run_of(self, path: Path) -> str | None:
        """The run whose folder holds `path` (the committer's scope), None outside runs/."""
        parts, base = path.parts, self._runs_parts
        return parts[len(base)] if len(parts) > len(base) and parts[: len(base)] == base else None

    def _on_unwritten(self, unwritten: list[groupcommit.Unwritten]) -> None:
        """In the writer thread: hand what it could not write to the loop."""
        self._unwritten.extend(unwritten)
        self._wake()

    def _take_unwritten(self) -> None:
        """Act on what the writer thread could not write, for a reason of the path's own: an
        active run whose file it was fails; a finished one whose end is not on disk gets
        its run.json written once more (_rewrite_final)."""
        while self._unwritten:
            u = self._unwritten.popleft()
            run_id = self._run_of(u.path)
            run = self.runs.get(run_id) if run_id is not None else None
            if run is not None:
                self._fail_run(run, f"cannot write {u.cause}: {u.error.strerror}")
            elif run_id is None:  # a cache entry a task broke, or the spool's own folders
                log.warning("cannot write %s: %s; not written", u.path, u.error.strerror)
        while self._refinish:
            self._rewrite_final(*self._refinish.popleft())

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
        self._dirty(run, urgent=True)

    def _rewrite_final(self, run: ActiveRun, lost: groupcommit.Unwritten) -> None:
        """A finished run whose final files did not all land (`lost` says which and why):
        its run.json is written once more, alone, saying the run failed and why. If that
        cannot be (run.json itself, or the run folder, is what failed), the run is dropped:
        one ERROR line, and its queue file goes (on_finished), so no restart resumes it."""
        reason = f"cannot write {lost.cause}: {lost.error.strerror}"
        record = run.dir / "run.json"
        try:
            folder_ok = stat.S_ISDIR(os.lstat(run.dir).st_mode)
        except OSError:
            folder_ok = False
        rec = run.record
        if run.rewritten or lost.cause == record or not folder_ok:
            log.error(
                "%s dropped: %s; its end cannot be recorded in %s, and it is not resumed",
                run.run_id,
                reason,
                run.dir,
            )
            rec["state"], rec["error"] = "failed", reason  # for its summary line and metric
            if self.on_finished is not None:
                self.on_finished(run)
            return
        run.rewritten = True
        if rec["state"] != "failed":  # else it says why already (a stage, or _fail_run)
            log.warning("%s failed: %s", run.run_id, reason)
            rec["state"] = "failed"
            rec["error"] = reason
        self._committer.submit([(record, atomic.dumps(rec))], on_done=self._finished_callback(run))

    def _flush(self, now: float, on_done: Callable[[], None] | None = None) -> None:
        """Hand this step's writes to the committer (one group commit, in order)."""
        for run_id, due in list(self._due.items()):
            if due <= now:
                run = self.runs[run_id]
                self._writes.append((run.dir / "manifest.json", self._manifest(run)))
                if run.record_stale:
                    run.record_stale = False
                    self._writes.append((run.dir / "run.json", atomic.dumps(run.record)))
                del self._due[run_id]
        if not self._writes and not self._new_dirs and not self._synced and on_done is None:
            return
        writes, self._writes = self._writes, []
        folders, self._new_dirs = self._new_dirs, set()
        synced, self._synced = self._synced, []
        self._committer.submit(writes, folders, on_done, synced)


def _sooner(a: float | None, b: float | None) -> float | None:
    """The earlier of two waits (None: no limit)."""
    return b if a is None else a if b is None else min(a, b)


def _log_header(path: Path, text: str) -> str | None:
    """Append `text` to a stage's log; the attempt's error when the log cannot take it (a
    task put a FIFO, a folder or a link in its place). OSError: for want of a writable
    spool (the attempt waits, uncharged)."""
    try:
        fd = runner.open_log(str(path))
    except runner.SpawnError as exc:
        if exc.no_room is not None:
            raise OSError(exc.no_room, os.strerror(exc.no_room), str(path)) from None
        return str(exc)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return None


def _folders(run: ActiveRun, stage: str, shard: int | None) -> tuple[Path, tuple[Path, ...]]:
    """A unit's folder, and the folders to make for it, parents first."""
    base = run.dir / "stages" / stage
    folder = base if shard is None else base / str(shard)
    return folder, tuple(dict.fromkeys((base, folder, folder / "artifacts")))


def _shard_artifacts(run_id: str, stage_folder: Path, run_dir: Path) -> list[dict[str, str]]:
    """A sharded stage's artifacts: every shard's, in shard order (each checked when its
    shard ended). A shard's that can no longer be listed (another task of the run replaced
    its folder, or put a FIFO in it since) is left out, with a warning: no attempt is left
    to fail for it."""
    try:
        with os.scandir(stage_folder) as entries:
            shards = sorted(
                (e.name for e in entries if e.name.isdigit() and e.is_dir(follow_symlinks=False)),
                key=int,
            )
    except OSError as exc:
        log.warning("%s: cannot list the shards of %s: %s", run_id, stage_folder, exc.strerror)
        return []
    out: list[dict[str, str]] = []
    for shard in shards:
        listing, problem = scan_artifacts(stage_folder / shard / "artifacts", stage_folder, run_dir)
        if problem is not None:
            log.warning(
                "%s stage %s shard %s: %s; its artifacts are left out of the stage's output.json",
                run_id,
                stage_folder.name,
                shard,
                problem,
            )
            continue
        out.extend(listing)
    return out


def _run_error(graph: RunGraph) -> str | None:
    if graph.aborted is not None:
        return graph.aborted
    if graph.cancelled:
        return "cancelled"
    for stage in graph.stages.values():
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
