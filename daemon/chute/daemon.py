"""The daemon: one loop that takes dropped files, fires schedules and drives runs.

Owns: the spool lock (state/lock), start-up recovery, the main loop, signals, carrying out
control requests, state/status.json and retention. Not here: taking a
file (chute.intake), reading and checking a request (chute.control), fire times
(chute.schedules), a run's stages and what recovery decides for one run (chute.engine),
processes (chute.local), what a dead daemon or `chute run` left running (chute.owners).
Crash safety: an accepted run is known by its queue/<run_id>.yaml, which is removed only
after the run's final run.json is durable (the committer's callback), or when no run.json
can be written or read in its folder any more (the run is dropped, with an ERROR line:
chute.engine.loop, and recovery here). So after any crash, queue/ lists exactly the runs
to resume: queued ones start, running and stopped ones (a SIGTERM under `on_restart:
resume`) resume in place from their finished stages (output.json done-marks) or become
interrupted (`on_restart: fail`), finished ones just lose their queue file. A scheduled fire makes
its run under an id derived from (schedule, fire time) before the fire is recorded, so a
crash in between makes the same run id again, which exists: no second run (a run made
but not queued is queued then, never removed). A control request's effect is durable
before its file is removed (chute.control), so a replay after a crash is a no-op or
finishes the work. Recovery contains a failure to the run, schedule or claim it concerns:
that one is failed or set aside with one line, the daemon starts.
What a dead daemon left running (its cgroups, the process groups and workers it recorded,
processes carrying the cookie of this spool's runs) is killed before anything starts, and
so is what dead `chute run`s left (chute.owners.start_daemon); a live `chute run`'s tasks
are left alone.
Diagnostics: environment trouble (a second daemon, inotify limits, an unwritable spool) is
one ERROR line with the knob; user mistakes go to rejected/ (chute.intake, chute.control).
Limits: signals only set flags and wake the loop; everything else happens in the loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from chute import __version__, access, atomic, control, logs, owners, report, retention
from chute.clock import Clock, rfc3339
from chute.config import Config, ConfigError, load_config
from chute.engine import reasons, runs
from chute.engine.dag import RunGraph
from chute.engine.loop import ActiveRun, Engine
from chute.faults import crash_point
from chute.http import HttpError, Server, health, read_token, serve
from chute.intake import Accepted, Handover, Intake, Outcome, Rejected, Scheduled, Watcher
from chute.local import LocalExecutor
from chute.metrics import Metrics, Snapshot
from chute.notify import Notifier
from chute.schedules import Fire, Schedules, overlap_decision
from chute.spec import SpecError, load_bytes
from chute.spec.fields import MAX_RUN_TASKS
from chute.spec.model import Pipeline
from chute.spool import Spool, sync_roots
from chute.topology import Topology, read_topology
from chute.units import format_size

log = logging.getLogger(__name__)

CONTROL_INTERVAL = 0.25
POLL_INTERVAL = 1.0  # seconds between scans of incoming/ without inotify (`watch: poll`)
INTAKE_BATCH = 64  # files taken per loop pass: one group commit, then tasks get their turn
INTAKE_BYTES = 64 << 10  # and so many bytes of them: validating takes ~1-3 ms per KiB
# Backpressure: past either bound new files wait, durable, in incoming/ until runs finish;
# memory stays bounded whatever a flood drops at once. A run costs ~10 KB of memory besides
# its tasks, a task ~0.3 KB while its run waits and up to ~1.8 KB once it has started (its
# manifest entry). Near MAX_ACTIVE_TASKS a batch takes no more files than runs of
# MAX_RUN_TASKS would fill, so a batch overshoots it by one run's tasks at most.
MAX_ACTIVE_RUNS = 5000
MAX_ACTIVE_TASKS = 100_000
SYNC_HERE = 4
"""Runs accepted in one batch that the loop syncs itself (~1 ms a run, as before the writer
thread took them over) rather than queue them behind the writer's batch in progress, which
holds other runs' final writes: a single drop starts without that wait, while a burst's
big batches still sync beside the loop."""
REPORT_DELAY = 5.0  # while runs are active, a report.html waits up to this long (seconds)
STATUS_INTERVAL = 1.0
STATUS_WAITING = 200  # runs status.json details, in queue order (the API knows them all)
GC_INTERVAL = 60.0
GC_BATCH = 50  # folders and files removed per retention pass: deleting thousands stalls runs
GC_AGAIN = 5.0  # seconds to the next pass when GC_BATCH cut one short: a backlog drains
RESTART_KEYS = ("spool", "runs_dir", "http_listen", "watch")


EXIT_CANNOT_START = 2
"""A bad config or an unusable spool: restarting cannot fix it (systemd/chute.service has
RestartPreventExitStatus=2), and `chute` uses 2 for usage and input errors anyway."""


class SpoolLocked(Exception):
    """Another daemon owns this spool."""


def unwritable(spool: Spool, exc: OSError) -> str:
    """One line for a spool folder the daemon cannot write, with what to do."""
    where = exc.filename or str(spool.root)
    if Path(where).is_relative_to(spool.runs) and not spool.runs.is_relative_to(spool.root):
        fix = "set runs_dir in the config to a writable folder"
    else:
        fix = "pass another --spool"
    code = errno.errorcode.get(exc.errno or 0, "?")
    return (
        f"cannot write {where}: {exc.strerror} ({code}); the daemon writes every folder of its "
        f"spool: make it writable by {runs.submitter()['user'] or os.getuid()} and mounted "
        f"read-write, or {fix}"
    )


def lock_path(spool: Spool) -> Path:
    return spool.state / "lock"


LOCK_WAIT = 1.0  # seconds a starting daemon waits for a CLI command that holds the lock


def acquire_lock(spool: Spool) -> int:
    """Hold state/lock for the daemon's life; SpoolLocked names the holder. A CLI command
    that acts without a daemon holds the lock for a moment (lock_if_free): that is waited
    for, up to LOCK_WAIT."""
    fd = os.open(lock_path(spool), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SpoolLocked(
            f"another chute daemon (pid {holder}) already runs on {spool.root}; "
            "one daemon per spool (stop it, or use another --spool)"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def daemon_pid(spool: Spool) -> int | None:
    """The pid of the daemon holding this spool, or None when none does."""
    try:
        fd = os.open(lock_path(spool), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def lock_if_free(spool: Spool) -> int | None:
    """For a CLI command that changes runs without a daemon: hold state/lock (close the
    returned fd to let go), so no daemon starts and resumes a run meanwhile; None when a
    daemon holds it."""
    try:
        fd = os.open(lock_path(spool), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # no state/ yet: no daemon ever ran here
        spool.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(spool), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@dataclass(slots=True)
class _ScheduleState:
    pipeline: Pipeline
    raw: bytes
    active: set[str] = field(default_factory=set)  # run ids of this schedule not finished


class Daemon:
    def __init__(
        self, spool: Spool, config: Config, config_path: str | None, clock: Clock | None = None
    ) -> None:
        self.spool = spool
        self.config = config
        self.config_path = config_path
        self.clock = clock or Clock()
        self.notifier = Notifier()
        self._stop = False
        self._reload = False
        self._finished: deque[ActiveRun] = deque()  # filled by the writer thread
        self._handed: deque[Handover] = deque()  # accepted runs now durable: writer thread
        self._in_flight = 0  # runs accepted whose handover is not back from the writer yet
        self._in_flight_tasks = 0  # their tasks (Pipeline.tasks)
        self._pending: dict[str, None] = {}  # names in incoming/ to take, in arrival order
        self._reports: deque[tuple[float, Path]] = deque()  # (finished, run dir): report due
        self._schedules: dict[str, _ScheduleState] = {}
        self._owner: owners.Owner | None = None
        self._watch_event = threading.Event()
        self._watch_drained = threading.Event()
        self._watch_stop_r, self._watch_stop_w = os.pipe2(os.O_CLOEXEC)
        self.started_at = self.clock.time()
        self.misfires = 0  # fires that got no run of their own (chute_schedule_misfires_total)
        self.metrics = Metrics(version=__version__, start_time=self.started_at)
        self.http: Server | None = None
        self.last_tick = self.clock.monotonic()  # set each loop iteration; /healthz reads it
        self._write_error: OSError | None = None  # the committer failure counted last
        self._control_held: set[str] = set()  # requests a chute bug left: tried at next start
        self._control_trouble: dict[str, int | None] = {}  # request -> errno logged for it
        self._swept = False  # retention's first pass sweeps pipelines/ (chute.retention)
        self._retention_changed = False  # a reload changed it: a pass at once
        self._cache_sizes: dict[str, tuple[int, int]] = {}  # retention's measures of cache/

    # -- life ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM: 0; a configuration or spool the operator must fix: one
        ERROR line and EXIT_CANNOT_START (the unit's RestartPreventExitStatus=)."""
        try:
            self.topology = _topology(self.config)
        except (ValueError, OSError) as exc:
            log.error("config %s: %s", self.config_path or "(defaults)", exc)
            return EXIT_CANNOT_START
        try:
            self.spool.ensure()
            (self.spool.state / "intake").mkdir(exist_ok=True)
            self.spool.check_writable()
        except OSError as exc:
            log.error("%s", unwritable(self.spool, exc))
            return EXIT_CANNOT_START
        lock_fd = acquire_lock(self.spool)
        try:
            return self._run()
        finally:
            os.close(lock_fd)

    def _run(self) -> int:
        cfg = self.config
        try:  # bound before anything else: a taken port is one ERROR line and exit 1
            self.http = serve(
                cfg.http_listen,
                spool=self.spool,
                registry=self.metrics.registry,
                health=self._health,
                token=read_token(cfg.http_token_file),
            )
        except HttpError as exc:
            log.error("%s", exc)
            return 1
        self._owner = owners.start_daemon(self.spool, cfg.kill_grace)
        self.executor = LocalExecutor(
            kill_grace=cfg.kill_grace,
            log_limit=cfg.log_limit,
            max_workers=len(self.topology.cpus),
            clock=self.clock,
            owner=self._owner,
        )
        self._syncfs = sync_roots(cfg, self.spool)
        self.engine = Engine(
            spool=self.spool,
            executor=self.executor,
            topology=self.topology,
            policy=cfg.policy,
            clock=self.clock,
            on_finished=self._on_finished,
            events=self.metrics,
            syncfs=self._syncfs,
        )
        self.intake = Intake(
            self.spool,
            cfg,
            node_cpus=len(self.topology.cpus),
            node_memory=self.topology.memory,
            clock=self.clock,
        )
        self.schedules = Schedules(self.spool.state)
        watcher: Watcher | None = None
        watch_thread: threading.Thread | None = None
        old_handlers = {
            s: signal.signal(s, self._on_signal)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            self._recover()
            if cfg.watch == "auto":
                try:
                    watcher = Watcher(self.spool)
                except OSError as exc:
                    log.error("%s; falling back to scans every %.0fs", exc, POLL_INTERVAL)
            if watcher is not None:
                watch_thread = threading.Thread(
                    target=self._watch, args=(watcher,), name="chute-watch", daemon=True
                )
                watch_thread.start()
            self._rescan()  # taken in batches by the loop, after READY=1
            log.info(
                "daemon started spool=%s cpus=%d policy=%s watch=%s sync=%s http=%s",
                self.spool.root,
                len(self.topology.cpus),
                cfg.policy,
                "inotify" if watcher is not None else "poll",
                "syncfs" if self._syncfs else "fsync",
                self.http.address,
            )
            log.info("%s", self._owner.fence)
            self.http.start()
            self.notifier.ready(self._status_text())
            logs.hold()  # the loop's lines go out once per turn (chute.logs)
            try:
                self._loop(watcher)
            finally:
                logs.unhold()
        finally:
            self.http.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if watch_thread is not None:
                os.write(self._watch_stop_w, b"x")
                self._watch_drained.set()
                watch_thread.join()
            if watcher is not None:
                watcher.close()
            self.executor.close()
            resumes = self.config.on_restart == "resume"
            left = self.engine.interrupt(resumes=resumes)
            self.engine.close()
            self._drain_finished()
            self._drain_handed(start=False)  # durable now; they wait in queue/ for next start
            self._write_reports(budget=10.0)
            if left:
                log.warning(
                    "stopped with %d run(s) unfinished: %s; %s",
                    len(left),
                    ", ".join(r.run_id for r in left[:10]),
                    "they resume at next start (stopped)"
                    if resumes
                    else "they are over (interrupted; on_restart: fail)",
                )
            if self._owner is not None:
                self._owner.release()
            for fd in (self._watch_stop_r, self._watch_stop_w):
                os.close(fd)
        log.info("daemon stopped")
        return 0

    def _reports_due(self, now: float) -> bool:
        """A report.html is written when nothing else waits: at once when no run is active,
        else once the oldest has waited REPORT_DELAY (a page is ~1 ms of pure Python and
        three files: a burst of runs finishes first, its pages follow)."""
        if not self._reports or self.engine.tasks_waiting:
            return False
        return not self.engine.runs or now - self._reports[0][0] >= REPORT_DELAY

    def _write_reports(self, budget: float) -> None:
        """report.html of finished runs, for at most `budget` seconds. Called when the loop
        has nothing else to do: in a thread it would hold the GIL while every system call of
        the loop waits for it."""
        deadline = time.monotonic() + budget
        while self._reports and time.monotonic() < deadline:
            report.write_report_or_log(self._reports.popleft()[1])

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True
        self.executor.wake()

    def _watch(self, watcher: Watcher) -> None:
        """Wake the loop when inotify has events; the loop reads them."""
        import select

        while True:
            ready, _, _ = select.select([watcher.fileno(), self._watch_stop_r], [], [])
            if self._watch_stop_r in ready:
                return
            self._watch_drained.clear()
            self._watch_event.set()
            self.executor.wake()
            self._watch_drained.wait()

    # -- the loop --------------------------------------------------------------------------

    def _loop(self, watcher: Watcher | None) -> None:
        mono = self.clock.monotonic

        def rescan_every() -> float:  # inotify misses little; a poll is all there is
            return self.config.rescan_interval if watcher is not None else POLL_INTERVAL

        next_rescan = mono() + rescan_every()
        next_control = 0.0
        next_status = 0.0
        next_gc = mono() + 5.0
        next_ping = 0.0
        stop_deadline: float | None = None
        ping_every = self.notifier.watchdog_interval
        while True:
            cfg = self.config  # a SIGHUP may have replaced it
            now = mono()
            self._tick(now)
            if self._stop and stop_deadline is None:
                stop_deadline = now + cfg.stop_timeout
                self.engine.draining = True
                self.notifier.stopping()
                log.info(
                    "stopping: intake closed, giving %d running task(s) %.0fs",
                    self.engine.tasks_running,
                    cfg.stop_timeout,
                )
            if stop_deadline is not None and (
                self.engine.tasks_running == 0 or now >= stop_deadline
            ):
                return
            if self._reload:
                self._reload = False
                self._reload_config()
            if stop_deadline is None:
                if self._watch_event.is_set() and watcher is not None:
                    self._watch_event.clear()
                    names, deleted, overflowed = watcher.read()
                    self._watch_drained.set()
                    self._pending.update(dict.fromkeys(names))
                    for name in deleted:
                        self._unschedule(name.rsplit(".", 1)[0])
                    if overflowed:
                        self.metrics.inotify_overflowed()
                        log.warning("inotify queue overflowed; rescanning incoming/")
                        next_rescan = now
                if now >= next_rescan:
                    self._rescan()
                    self._sync_schedules()
                    next_rescan = now + rescan_every()
                if now >= next_control:
                    self._control()
                    next_control = now + CONTROL_INTERVAL
                self._fire_schedules()
            self._drain_handed()
            timeout = self.engine.step()
            # Files are taken after the step: tasks that can start are on their cores first,
            # and run while the loop reads and validates the next batch.
            if stop_deadline is None and self._pending and self._intake_room():
                self._take_batch()
            self._drain_finished()
            now = mono()
            if ping_every is not None and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + ping_every
            if now >= next_status:
                self._write_status()
                next_status = now + STATUS_INTERVAL
            if (now >= next_gc or self._retention_changed) and stop_deadline is None:
                next_gc = now + (GC_AGAIN if self._retention() else GC_INTERVAL)
            waits = [next_status, next_control if stop_deadline is None else next_status]
            if ping_every is not None:
                waits.append(next_ping)
            if stop_deadline is not None:
                waits.append(stop_deadline)
            wake = self.schedules.next_wakeup(self.clock.now())
            if wake is not None:
                waits.append(now + max(0.0, wake.timestamp() - self.clock.time()))
            until = min(waits) - now
            timeout = until if timeout is None else min(timeout, until)
            if self._pending and stop_deadline is None and self._intake_room():
                timeout = 0.0  # more files to take: only collect what is ready, then go on
            elif self._reports_due(now):
                self._write_reports(budget=0.02)
                if self._reports_due(now):
                    timeout = 0.0
            elif self._reports:
                timeout = min(timeout, max(0.0, self._reports[0][0] + REPORT_DELAY - now))
            logs.write_held()
            self.engine.handle(self.executor.poll(max(0.0, timeout)))

    # -- intake ----------------------------------------------------------------------------

    def _rescan(self) -> None:
        """inotify events are hints, the folder is the truth (Postfix pickup)."""
        for outcome in self.intake.finish_claims():
            self._take(outcome)
        self._pending.update(dict.fromkeys(self.intake.incoming_names()))

    def _take_batch(self) -> None:
        """Take at most INTAKE_BATCH pending names, and files of at most INTAKE_BYTES (one
        file at least): one group commit for all of them, and the loop gets back to starting
        tasks and collecting results between batches."""
        batch: list[str] = []
        size = 0
        for name in itertools.islice(self._pending, self._intake_room()):
            if batch and size >= INTAKE_BYTES:
                break
            batch.append(name)
            with contextlib.suppress(OSError):  # gone, or not a file: intake says so
                size += os.lstat(self.spool.incoming / name).st_size
        for name in batch:
            del self._pending[name]
        outcomes, handover = self.intake.take_deferred(batch)
        for outcome in outcomes:
            if not isinstance(outcome, Accepted):
                self._take(outcome)  # accepted runs start once their folders are durable
        if handover is None:
            return
        self._in_flight += len(handover.accepted)
        self._in_flight_tasks += sum(a.pipeline.tasks for a in handover.accepted)
        if len(handover.accepted) <= SYNC_HERE:
            try:
                handover.unsynced.sync()
            except OSError as exc:
                log.warning("syncing new runs failed (%s); the writer thread retries", exc)
            else:
                self._on_durable(handover)
                return
        self.engine.sync_then(handover.unsynced, lambda: self._on_durable(handover))

    def _intake_room(self) -> int:
        """How many files the next batch may take: 0 while the daemon holds MAX_ACTIVE_RUNS
        runs or MAX_ACTIVE_TASKS tasks (accepted ones not handed over yet included)."""
        runs = MAX_ACTIVE_RUNS - len(self.engine.runs) - self._in_flight
        tasks = MAX_ACTIVE_TASKS - self.engine.tasks_held - self._in_flight_tasks
        if runs <= 0 or tasks <= 0:
            return 0
        return min(INTAKE_BATCH, runs, max(1, tasks // MAX_RUN_TASKS))

    def _on_durable(self, handover: Handover) -> None:
        """In the writer thread: `handover`'s run folders and queue links are durable."""
        self._handed.append(handover)
        self.executor.wake()

    def _drain_handed(self, *, start: bool = True) -> None:
        while self._handed:
            handover = self._handed.popleft()
            self._in_flight -= len(handover.accepted)
            self._in_flight_tasks -= sum(a.pipeline.tasks for a in handover.accepted)
            self.intake.release(handover)
            if start:
                for accepted in handover.accepted:
                    self._take(accepted)

    def _take(self, outcome: Outcome) -> None:
        if isinstance(outcome, Accepted | Scheduled):
            self.metrics.file_accepted()
        if isinstance(outcome, Accepted):
            self.engine.add(
                ActiveRun(
                    run_id=outcome.run_id,
                    pipeline=outcome.pipeline,
                    graph=RunGraph(outcome.run_id, outcome.pipeline),
                    dir=self.spool.runs / outcome.run_id,
                    record=outcome.record,
                    accepted=outcome.accepted_at.timestamp(),
                    dropped_at=outcome.dropped_at,
                )
            )
        elif isinstance(outcome, Scheduled):
            self._schedule(outcome.name, outcome.pipeline, outcome.spec_bytes, outcome.accepted_at)
        elif isinstance(outcome, Rejected):
            self.metrics.file_rejected(outcome.reason)  # intake logged it

    def _schedule(self, name: str, pipeline: Pipeline, raw: bytes, accepted_at: datetime) -> None:
        assert pipeline.schedule is not None
        old = self._schedules.get(name)
        self._schedules[name] = _ScheduleState(pipeline, raw, active=old.active if old else set())
        self.schedules.set(name, pipeline.schedule, accepted_at)
        nxt = self.schedules.next_fire(name, self.clock.now())
        log.info(
            "schedule %s %s next=%s",
            name,
            "replaced" if old else "added",
            nxt.isoformat() if nxt else "never",
        )

    def _unschedule(self, name: str) -> None:
        if self._schedules.pop(name, None) is not None:
            self.schedules.remove(name)
            log.info("schedule %s removed", name)

    def _sync_schedules(self) -> None:
        """schedules/ is the truth: a file deleted while events were missed unschedules."""
        present = {p.stem for p in self.spool.schedules.glob("*.yaml")}
        for name in list(self._schedules):
            if name not in present:
                self._unschedule(name)

    def _load_schedules(self) -> None:
        """At start: every schedule file; one that fails (whatever the reason) is skipped
        with one line, and the rest load."""
        for path in sorted(self.spool.schedules.glob("*.yaml")):
            try:
                raw = path.read_bytes()
                pipeline = load_bytes(
                    raw,
                    f"schedules/{path.name}",
                    node_cpus=len(self.topology.cpus),
                    node_memory=self.topology.memory,
                )
                if pipeline.schedule is None:
                    continue
                accepted = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                self._schedule(path.stem, pipeline, raw, accepted)
            except (OSError, SpecError) as exc:
                log.error("schedules/%s cannot be loaded: %s; skipping it", path.name, exc)
            except Exception:
                log.exception("schedules/%s cannot be loaded (a chute bug); skipping it", path.name)
        try:
            forgotten = self.schedules.retain(list(self._schedules))
        except OSError as exc:
            log.error("%s: cannot forget gone schedules: %s", exc.filename, exc.strerror)
            forgotten = []
        if forgotten:
            log.info("forgot state of schedules whose files are gone: %s", ", ".join(forgotten))
        self._remove_spent()  # fired before a crash that came before their removal

    def _fire_schedules(self) -> None:
        if not self._schedules:
            return
        if self._write_trouble() is not None:
            return  # fires wait (within grace they run late; past it misfire rules apply)
        if self.schedules.unsaved:
            self.schedules.save()
        for name, state in self._schedules.items():
            self._start_held(name, state)
        now = self.clock.now()
        due = self.schedules.due(now)
        for name, fire_time in due.skipped:
            log.warning("schedule %s misfired at %s: skipped (misfire: skip)", name, fire_time)
            self.schedules.record(name, fire_time)
            self._count_misfires(due.misfired[name])
        for fire in due.fires:
            st = self._schedules.get(fire.name)
            if st is None:
                continue
            sched = st.pipeline.schedule
            assert sched is not None
            held = self.schedules.held(fire.name) is not None
            decision = overlap_decision(sched.overlap, bool(st.active), held)
            if decision == "run":
                if not self._start_fire(st, fire):
                    continue  # not recorded: due() offers it again once the spool is writable
            elif decision == "queue":
                self.schedules.hold(fire)
                log.info(
                    "schedule %s fire %s queued behind its running run", fire.name, fire.fire_time
                )
            else:
                log.info(
                    "schedule %s fire %s skipped: previous run still running",
                    fire.name,
                    fire.fire_time,
                )
            self.metrics.schedules_fired(1, 0)  # counted once: when recorded
            self.schedules.record(fire.name, fire.fire_time)
            self._count_misfires(due.misfired[fire.name])
        if due.fires or due.skipped:
            self._remove_spent()

    def _remove_spent(self) -> None:
        """An `at` schedule that fired (or was skipped) leaves schedules/: it would only be
        listed as `next: never`. Its fire is recorded first, so a crash before the unlink
        just removes it at the next start (the state says it fired)."""
        for name in self.schedules.spent():
            crash_point("schedules.spent")  # the fire is recorded; the file is still there
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spool.schedules / f"{name}.yaml")
            atomic.fsync_dir(self.spool.schedules)
            self._unschedule(name)
            log.info(
                "schedule %s done: its `at` fire is past; removed schedules/%s.yaml", name, name
            )

    def _count_misfires(self, n: int) -> None:
        """Count a recorded fire's misfires (an unrecorded one is offered again, and counted
        then)."""
        self.misfires += n
        self.metrics.schedules_fired(0, n)

    def _start_held(self, name: str, st: _ScheduleState) -> None:
        """Start the fire overlap: queue holds for `name` once its previous run has ended.
        One whose run exists already (a crash came before its release) is only released,
        so the next fire can be held in its place."""
        fire = self.schedules.held(name)
        if fire is None:
            return
        if self._fire_made(fire.run_id()) or (not st.active and self._start_fire(st, fire)):
            self.schedules.release(name)

    def _fire_made(self, run_id: str) -> bool:
        """Whether a fire's run was made already: waiting or running (its queue file), or
        run to the end since."""
        return (self.spool.queue / f"{run_id}.yaml").exists() or runs.finished_on_disk(
            self.spool.runs / run_id
        )

    def _write_trouble(self) -> OSError | None:
        """Why the spool cannot be written now (engine or intake), or None."""
        return self.engine.write_error or self.intake.write_error

    def _start_fire(self, st: _ScheduleState, fire: Fire) -> bool:
        """Make the fire's run; False when the spool cannot be written (retried later)."""
        run_id = fire.run_id()
        if self._fire_made(run_id):
            return True  # made before a crash: resumed by recovery, or run since
        try:
            self._make_fire_run(st, fire, run_id)
        except OSError as exc:
            # Nothing is removed: a run folder made so far is finished by the next try.
            log.error(
                "schedule %s fire %s: cannot make its run (%s); retrying when the spool is "
                "writable",
                fire.name,
                fire.fire_time,
                exc,
            )
            return False
        except (SpecError, runs.Unrecoverable, ValueError) as exc:
            log.error(
                "schedule %s fire %s: its run %s was half made before a stop and cannot be "
                "finished (%s); this fire is not run",
                fire.name,
                fire.fire_time,
                run_id,
                exc,
            )
        return True

    def _make_fire_run(self, st: _ScheduleState, fire: Fire, run_id: str) -> None:
        if os.path.lexists(self.spool.runs / run_id / "run.json"):
            # Made before a crash (run.json) but not queued: queue that run, never a second.
            made = runs.queue_made(
                self.spool,
                run_id,
                st.raw,
                node_cpus=len(self.topology.cpus),
                node_memory=self.topology.memory,
            )
            if made is not None:
                st.active.add(run_id)
                self.engine.add(made)
            return
        run = runs.create_run(  # a folder without run.json is half made: create makes it again
            self.spool,
            st.pipeline,
            st.raw,
            trigger={
                "type": fire.trigger,
                "source": f"schedules/{fire.name}.yaml",
                "fire_time": rfc3339(fire.fire_time),
            },
            now=self.clock.now(),
            # The schedule's submitter's run, so they may cancel it (unknown: the daemon's).
            submitted_by=access.schedule_submitter(self.spool, fire.name),
            run_date=fire.run_date,
            run_id=run_id,
        )
        # Crash point: the fire's run exists (run.json queued), not its queue file, and the
        # fire is not recorded: the next start offers the fire again and queues this run.
        crash_point("schedules.run_made")
        atomic.write_bytes(self.spool.queue / f"{run_id}.yaml", st.raw)
        st.active.add(run_id)
        self.engine.add(run)
        extra = f" (standing for {fire.missed} missed)" if fire.missed else ""
        log.info(
            "%s fired schedule %s for %s%s", run_id, fire.name, fire.fire_time.isoformat(), extra
        )

    # -- finished runs ---------------------------------------------------------------------

    def _on_finished(self, run: ActiveRun) -> None:
        """In the writer thread, once a run's final run.json is durable."""
        # Handover: run.json says the run is over (durable); the queue copy can go. Here,
        # not in the loop: an unlink was 5% of the loop in a burst of runs.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool.queue / f"{run.run_id}.yaml")
        self._finished.append(run)

    def _drain_finished(self) -> None:
        while self._finished:
            run = self._finished.popleft()
            self._reports.append((self.clock.monotonic(), run.dir))  # see _reports_due
            rec = run.record
            self.metrics.run_finished(str(rec["state"]), rec.get("duration_seconds"))
            stages = " ".join(f"{s.name}={s.state}" for s in run.graph.stages.values())
            log.info(
                "%s finished state=%s duration=%ss pipeline=%s stages: %s",
                run.run_id,
                rec["state"],
                rec.get("duration_seconds"),
                run.pipeline.name,
                stages[:2000],
            )
            for name, st in self._schedules.items():
                if run.run_id in st.active:
                    st.active.discard(run.run_id)
                    self._start_held(name, st)  # when it cannot, _fire_schedules tries again

    # -- recovery --------------------------------------------------------------------------

    def _recover(self) -> None:
        """At start: finish interrupted intake, load schedules, then each run of queue/. A
        step that fails for one file or run is contained to it (one line; log.exception
        for a chute bug), and the daemon starts anyway."""
        for folder in (self.spool.queue, self.spool.schedules, self.spool.control):
            atomic.remove_temp_leftovers(folder)
        try:
            outcomes = self.intake.recover()
        except OSError as exc:
            log.error(
                "intake recovery stopped at %s: %s; claims left are retried at each rescan",
                exc.filename,
                exc.strerror,
            )
            outcomes = []
        except Exception:
            log.exception(
                "intake recovery failed (a chute bug); claims left are retried at each rescan"
            )
            outcomes = []
        try:  # after intake's: what intake rejected it repairs itself
            control.repair(self.spool, self.clock.now())
        except OSError as exc:
            log.error("rejected/: cannot repair rejected requests: %s", exc)
        for outcome in outcomes:
            try:
                self._take(outcome)
            except Exception:
                log.exception("taking %s after a restart failed (a chute bug)", outcome)
        self._load_schedules()
        resumed = interrupted = 0
        for path in sorted(self.spool.queue.glob("*.yaml")):
            run_id = path.stem
            try:
                got = runs.recover(
                    self.spool,
                    run_id,
                    on_restart=self.config.on_restart,
                    now=self.clock.time(),
                    node_cpus=len(self.topology.cpus),
                    node_memory=self.topology.memory,
                )
            except Exception as exc:  # noqa: BLE001 (contained to this run; logged there)
                self._recovery_failed(run_id, exc)
                continue
            if got.state == "interrupted":
                interrupted += 1
                self.metrics.run_finished("interrupted", None)
            if got.run is None:
                continue
            resumed += got.started and not got.cancel
            trig = got.run.record.get("trigger")
            if isinstance(trig, dict) and trig.get("type") in ("cron", "every", "at"):
                name = Path(str(trig.get("source", ""))).stem
                if name in self._schedules:
                    self._schedules[name].active.add(run_id)
            self.engine.add(got.run)
            if got.cancel:
                log.info("%s cancel requested before the stop: ending it cancelled", run_id)
                self.engine.cancel(run_id)
        if resumed or interrupted:
            log.warning(
                "recovered after a stop or crash: %d run(s) resumed, %d marked interrupted",
                resumed,
                interrupted,
            )

    def _recovery_failed(self, run_id: str, exc: Exception) -> None:
        """Called in an except block: end the run recovery could not resume (failed, or its
        queue file set aside) and say so in one line, with a traceback for a chute bug."""
        reason = _reason(exc)
        try:
            marked = runs.recovery_failed(self.spool, run_id, reason, self.clock.time())
        except OSError as err:
            outcome = (
                f"and its queue file cannot be set aside ({err.strerror}): it is tried again "
                "at the next start"
            )
        else:
            if marked:
                self.metrics.run_finished("failed", None)
                outcome = "marked failed"
            else:
                outcome = (
                    f"its run.json cannot be written, so queue/{run_id}.yaml is set aside as "
                    f"queue/{run_id}.yaml{runs.UNRECOVERABLE_SUFFIX}: look at runs/{run_id}/"
                )
        if isinstance(exc, runs.Unrecoverable | SpecError | OSError | ValueError):
            log.error("%s recovery failed: %s; %s", run_id, reason, outcome)
        else:
            log.exception("%s recovery failed (a chute bug): %s; %s", run_id, reason, outcome)

    # -- control, status, config, retention ------------------------------------------------

    def _control(self) -> None:
        """Carry out the requests in control/ (chute.control): each request's effect is
        durable before its file goes; a bad one, or one whose requester may not make it
        (control.authorize), goes to rejected/; one that cannot be carried out yet (a full
        disk, a run not handed to the engine yet) waits."""
        pending = control.pending(self.spool)
        for name in set(self._control_trouble) - set(pending):
            del self._control_trouble[name]
        for name in pending:
            if name in self._control_held:
                continue
            try:
                request, requester = control.read(self.spool, name)
            except control.BadRequest as exc:
                self._reject_request(name, exc)
                continue
            except FileNotFoundError:
                continue  # gone meanwhile: a benign race
            except OSError as exc:
                self._control_failed(name, exc)
                continue
            try:
                control.authorize(self.spool, request, requester, self.config)
                done = self._carry_out(request, requester)
            except control.BadRequest as exc:
                self._reject_request(name, exc)
                continue
            except OSError as exc:
                self._control_failed(name, exc)
                continue
            except Exception:
                log.exception("control/%s: failed (a chute bug); left until the next start", name)
                self._control_held.add(name)
                continue
            self._control_trouble.pop(name, None)
            if done:
                control.finish(self.spool, name)

    def _control_failed(self, name: str, exc: OSError) -> None:
        """The environment (a full disk, permissions): one ERROR line per request and errno;
        the request stays in control/ and is tried again at each pass."""
        if self._control_trouble.get(name) != exc.errno:
            log.error(
                "control/%s: cannot carry it out: %s: %s (errno %s); it waits and is retried: "
                "free space or fix permissions on the spool",
                name,
                exc.filename or self.spool.root,
                exc.strerror,
                exc.errno,
            )
        self._control_trouble[name] = exc.errno

    def _reject_request(self, name: str, exc: control.BadRequest) -> None:
        self._control_trouble.pop(name, None)
        try:
            control.reject(self.spool, name, exc, self.clock.now())
        except FileNotFoundError:
            return
        except OSError as err:
            log.error("control/%s: cannot move it to rejected/: %s", name, err.strerror)
            self._control_held.add(name)
            return
        self.metrics.file_rejected(exc.reason)

    def _carry_out(self, request: control.Request, requester: int) -> bool:
        """Do what `request` asks, durably; False when it must wait for a later pass."""
        if isinstance(request, control.Cancel):
            return self._cancel(request.run)
        if isinstance(request, control.Retry):
            self._retry(request, requester)
            return True
        if control.unschedule_file(self.spool, request.name):
            log.info("schedule %s unscheduled by request", request.name)
        self._unschedule(request.name)
        return True

    def _cancel(self, run_id: str) -> bool:
        run_dir = self.spool.runs / run_id
        if run_id in self.engine.runs:
            # Handover: the mark is durable before the cancel is acted on, so a restart ends
            # the run cancelled rather than resuming it.
            runs.mark_cancelled(run_dir, self.clock.time())
            self.engine.cancel(run_id)
            log.info("%s cancel requested", run_id)
            return True
        if (self.spool.queue / f"{run_id}.yaml").exists() and not runs.finished_on_disk(run_dir):
            return False  # accepted, not handed to the engine yet: the next pass cancels it
        log.info("%s cancel requested but the run is not active", run_id)
        return True

    def _retry(self, request: control.Retry, requester: int) -> None:
        try:
            plan = runs.plan_retry(
                self.spool.runs / request.run,
                request.from_stage,
                node_cpus=len(self.topology.cpus),
                node_memory=self.topology.memory,
            )
            run = runs.make_retry(  # the retry is its requester's run, as `chute run` is
                self.spool,
                plan,
                now=self.clock.now(),
                new_id=request.new_run_id,
                queue=True,
                submitted_by=runs.submitter(requester),
            )
        except runs.RetryRefused as exc:
            if runs.abandon_retry(
                self.spool, request.new_run_id, request.run, str(exc), self.clock.time()
            ):
                log.warning("%s ended failed: its retry cannot be finished", request.new_run_id)
            raise control.BadRequest("bad_request", "", f"retry refused: {exc}") from None
        if run is None:
            return  # made before a crash: queued (recovery resumed it) or run since
        self.engine.add(run)
        log.info("%s retry of %s keeps %d stage(s)", run.run_id, plan.old_id, len(plan.reused))

    def _tick(self, now: float) -> None:
        """Once per loop iteration: /healthz sees the loop alive; a new write failure counts."""
        self.last_tick = now
        err = self._write_trouble()
        if err is not None and err is not self._write_error:
            self.metrics.spool_write_failed()
        self._write_error = err

    def _health(self) -> str | None:
        """For /healthz (the HTTP thread). The loop never waits longer than STATUS_INTERVAL:
        next_status is always one of its wake-ups."""
        return health(
            self.clock.monotonic(), self.last_tick, STATUS_INTERVAL, self._write_trouble()
        )

    def _status_text(self) -> str:
        queued = sum(1 for r in self.engine.runs.values() if r.record["state"] == "queued")
        return (
            f"{queued} queued, {len(self.engine.runs) - queued} running, "
            f"{self.engine.cores_in_use}/{len(self.topology.cpus)} cpus"
        )

    def _write_status(self) -> None:
        allocated = self.engine.cores_by_node()
        queued = sum(1 for r in self.engine.runs.values() if r.record["state"] == "queued")
        waiting = self.engine.waiting()
        now = self.clock.now()
        held = []
        for name, st in sorted(self._schedules.items()):
            fire = self.schedules.held(name)
            if fire is not None:
                held.append(
                    {
                        "schedule": name,
                        "for": reasons.HELD,
                        "fire_time": rfc3339(fire.fire_time),
                        "run_id": fire.run_id(),
                        "behind": sorted(st.active),
                    }
                )
        fires = [(t, n) for n in self.schedules.names() if (t := self.schedules.next_fire(n, now))]
        doc = {
            "pid": os.getpid(),
            "started_at": rfc3339(self.started_at),
            "updated_at": rfc3339(self.clock.time()),
            "spool": str(self.spool.root),
            "policy": self.config.policy,
            "cpus": [  # cores: what `chute run --here` leaves alone
                {
                    "numa_node": i,
                    "total": len(cores),
                    "allocated": allocated.get(i, 0),
                    "cores": self.topology.cpulist(cores),
                }
                for i, cores in enumerate(self.topology.nodes)
            ],
            "memory": {"total": self.topology.memory, "free": waiting.free_memory},
            "runs": {"queued": queued, "running": len(self.engine.runs) - queued},
            "tasks": {
                "running": self.engine.tasks_running,
                "waiting": self.engine.tasks_waiting,
                "waiting_for": waiting.tasks,
                "retrying": waiting.retrying,
            },
            # Runs with a task not started, in queue order (chute.engine.reasons).
            "waiting": [r.full_doc() for r in waiting.runs[:STATUS_WAITING]],
            "waiting_runs": len(waiting.runs),
            "schedules": len(self._schedules),
            "next_fire": None
            if not fires
            else {"schedule": min(fires)[1], "for": reasons.SCHEDULE, "at": rfc3339(min(fires)[0])},
            "held": held,
            "http": self.http.address if self.http is not None else None,
        }
        self.metrics.publish(
            Snapshot(
                queue_depth=queued,
                tasks_running=self.engine.tasks_running,
                tasks_waiting=tuple(waiting.tasks.items()),
                cpus_total=tuple(len(cores) for cores in self.topology.nodes),
                cpus_allocated=tuple(allocated.get(i, 0) for i in range(len(self.topology.nodes))),
            )
        )
        if self.http is not None:
            self.http.waiting = {r.run_id: r for r in waiting.runs}  # replaced whole
        # Volatile: rewritten every second and only read by `chute status` and `chute show`.
        try:
            atomic.write_volatile(self.spool.state / "status.json", atomic.dumps(doc))
        except OSError as exc:
            log.debug("status.json not written: %s", exc)  # a full disk: healthz says so
        self.notifier.status(self._status_text())

    def _reload_config(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.notifier.ready(self._status_text())
            return
        for key in RESTART_KEYS:
            if getattr(new, key) != getattr(self.config, key):
                log.warning("config %s changed: takes effect after a restart", key)
        if new.sync != self.config.sync:
            self._syncfs = sync_roots(new, self.spool)
            self.engine.use_syncfs(self._syncfs)
            log.info("config sync=%s: %s", new.sync, "syncfs" if self._syncfs else "fsync")
        if (new.cpus, new.reserve_cpus, new.memory) != (
            self.config.cpus,
            self.config.reserve_cpus,
            self.config.memory,
        ):
            self._reload_topology(new)
        self.executor.configure(
            kill_grace=new.kill_grace,
            log_limit=new.log_limit,
            max_workers=len(self.topology.cpus),
        )
        if new.log_format != self.config.log_format:
            logs.setup(logging.getLogger().level, new.log_format)
        self._retention_changed |= retention.Rules.of(new) != retention.Rules.of(self.config)
        self.config = new
        self.engine.policy = new.policy
        self.intake.config = new
        if self.http is not None:
            try:
                self.http.token = read_token(new.http_token_file)
            except HttpError as exc:
                log.error("%s; keeping the previous token", exc)
        log.info("config reloaded from %s", self.config_path or "defaults")
        self.notifier.ready(self._status_text())

    def _reload_topology(self, new: Config) -> None:
        """Use the CPUs and memory of `new` from now on: running tasks keep their cores (one
        on a core taken away ends as it would have); waiting ones get the new cores."""
        try:
            topology = _topology(new)
        except (ValueError, OSError) as exc:
            log.error("config cpus/memory: %s; keeping the node as it was", exc)
            return
        self.topology = topology
        self.engine.topology = topology
        self.intake.node_cpus = len(topology.cpus)
        self.intake.node_memory = topology.memory
        log.info(
            "config cpus=%s (%d) memory=%s",
            topology.cpulist(topology.cpus),
            len(topology.cpus),
            format_size(topology.memory),
        )
        too_big = self.engine.waiting_beyond(topology)
        if too_big:
            log.warning(
                "%d waiting task(s) need more cpus or memory than the node now has and wait "
                "until a reload gives them back (or cancel their runs): %s",
                len(too_big),
                ", ".join(too_big[:10]),
            )

    def _retention(self) -> bool:
        """One retention pass (chute.retention), at most GC_BATCH removals; True when there
        is more to remove. The first pass of a daemon also sweeps pipelines/ for links to
        runs removed by hand or by an older chute."""
        owners.end_dead_foreground(self.spool, self.config.kill_grace, budget=owners.SWEEP_GRACE)
        removed = retention.gc(
            self.spool,
            retention.Rules.of(self.config),
            now=self.clock.time(),
            limit=GC_BATCH,
            active=self.engine.runs.keys(),
            sweep=not self._swept,
            sizes=self._cache_sizes,
        )
        self._swept = True
        self._retention_changed = False
        if removed or removed.links:
            log.info(
                "retention removed %d run folder(s), %d pipeline link(s), %d rejected file(s), "
                "%d cache entr%s%s",
                len(removed.runs),
                len(removed.links),
                len(removed.rejected),
                len(removed.cache),
                "y" if len(removed.cache) == 1 else "ies",
                "; more to remove" if removed.more else "",
            )
        return removed.more


def _topology(config: Config) -> Topology:
    return read_topology(cpus=config.cpus, reserve_cpus=config.reserve_cpus, memory=config.memory)


def _reason(exc: Exception) -> str:
    """One line for what went wrong: the path and errno text, a spec's issues, or the
    message."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if isinstance(exc, SpecError):
        return "; ".join(str(i) for i in exc.issues)
    return str(exc) or type(exc).__name__
