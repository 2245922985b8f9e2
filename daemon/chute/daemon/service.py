"""The daemon: its parts, its loop (one `step` at a time), start and stop.

Owns: making and wiring the daemon's parts, the loop (`step(now)` does a bounded turn of
work and returns the seconds until its next duty; `run` waits that long in the reactor),
its duties on timers (rescans, control requests, status, the watchdog, retention), the
stop (SIGTERM: intake closed, running tasks get `stop_timeout`), signals and reload
requests, and what follows a run's end. Not here: each part's own work: taking files
(chute.daemon.admission, chute.intake.drops), schedules (chute.daemon.fires), control requests
(chute.daemon.requests), recovery (chute.daemon.recovery), status (chute.daemon.status),
reports and retention (chute.daemon.upkeep), reload (chute.daemon.reload), runs
(chute.engine), processes (chute.execution.local).
Crash safety: see chute.daemon.recovery; the loop itself keeps nothing that a restart
needs.
Diagnostics: a configuration or spool the operator must fix: one ERROR line and
EXIT_CANNOT_START; environment trouble while running: one ERROR line with the knob.
Limits: signal handlers only set flags and wake the reactor; everything else happens on
the loop's thread. The parts' own bounds keep a turn short (a batch of files, the
allocator's walk); report pages are drawn only when nothing else waits.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from chute import __version__
from chute.clock import Clock
from chute.config import Config
from chute.engine.loop import ActiveRun, Engine
from chute.execution import owners
from chute.execution.executor import Result
from chute.execution.local import LocalExecutor
from chute.intake.decision import Scheduled
from chute.intake.drops import Intake
from chute.intake.watch import Watcher
from chute.observe import logs
from chute.observe.http import HttpError, Server, health, read_token, serve
from chute.observe.metrics import Metrics
from chute.observe.notify import Notifier
from chute.reactor import Reactor
from chute.store.spool import Spool, sync_roots

from . import reload as reloading
from .admission import Admission
from .fires import Fires
from .lock import acquire_lock, unwritable
from .recovery import recover
from .reload import topology_of
from .requests import Requests
from .status import Status
from .upkeep import GC_FIRST, Reports, Retention

log = logging.getLogger(__name__)

EXIT_CANNOT_START = 2
"""A bad config or an unusable spool: restarting cannot fix it (systemd/chute.service has
RestartPreventExitStatus=2), and `chute` uses 2 for usage and input errors anyway."""
CONTROL_INTERVAL = 0.25
POLL_INTERVAL = 1.0  # seconds between scans of incoming/ without inotify (`watch: poll`)
STATUS_INTERVAL = 1.0
REPORT_BUDGET = 0.02  # seconds of report pages per turn while the loop is otherwise idle


@dataclass(slots=True)
class Duty:
    """Work due at `due` (monotonic); `action` returns the seconds until it is due again."""

    name: str
    due: float
    action: Callable[[float], float]


class Daemon:
    """`run()` serves until SIGTERM. Tests drive it in-process: `open()`, then `step(now)`
    and `reactor.wait(...)` as they please, then `close()`."""

    def __init__(
        self, spool: Spool, config: Config, config_path: str | None, clock: Clock | None = None
    ) -> None:
        self.spool = spool
        self.config = config
        self.config_path = config_path
        self.clock = clock or Clock()
        self.notifier = Notifier()
        self.reactor = Reactor()
        self.started_at = self.clock.time()
        self.metrics = Metrics(version=__version__, start_time=self.started_at)
        self.http: Server | None = None
        self.owner: owners.Owner | None = None
        self.watcher: Watcher | None = None
        self.last_tick = self.clock.monotonic()  # set by each step; /healthz reads it
        self.done = False  # the loop has ended (stopped)
        self.stop_asked = False
        self.reload_asked = False
        self._lock_fd: int | None = None
        self._stop_deadline: float | None = None
        self._write_error: OSError | None = None  # the write failure counted last
        self._duties: list[Duty] = []

    # -- life ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM: 0; a configuration or spool the operator must fix: one
        ERROR line and EXIT_CANNOT_START; a port that cannot be had: 1."""
        # Before anything else: a SIGTERM during recovery stops the daemon at its first step.
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        handlers = {s: signal.signal(s, self._on_signal) for s in stops}
        opened = False
        try:
            code = self.open()
            if code is not None:
                return code
            opened = True
            assert self.http is not None
            self.http.start()
            self.notifier.ready(self.status.text())
            logs.hold()  # the loop's lines go out once per turn (chute.observe.logs)
            try:
                while not self.done:
                    timeout = self.step(self.clock.monotonic())
                    logs.write_held()
                    self.reactor.wait(timeout)
            finally:
                logs.unhold()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if opened:
                self.close()
        return 0

    def open(self) -> int | None:
        """Check the config and the spool, take the lock, make the parts and recover: ready
        to step. None when ready, else the exit code (the reason is logged)."""
        try:
            self.topology = topology_of(self.config)
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
        self._lock_fd = acquire_lock(self.spool)
        cfg = self.config
        try:  # bound before anything else: a taken port is one ERROR line and exit 1
            self.http = serve(
                cfg.http_listen,
                spool=self.spool,
                registry=self.metrics.registry,
                health=self._health,
                token=read_token(cfg.http_token_file),
                named=cfg.http_listen_from,
            )
        except HttpError as exc:
            log.error("%s", exc)
            self._release_lock()
            return 1
        self.owner = owners.start_daemon(self.spool, cfg.kill_grace)
        self._make_parts()
        recover(
            self.spool,
            clock=self.clock,
            on_restart=cfg.on_restart,
            intake=self.intake,
            fires=self.fires,
            engine=self.engine,
            metrics=self.metrics,
            node=self.node(),
            take=self.admission.take,
        )
        self._watch()
        self.admission.rescan()  # taken in batches by the loop, after READY=1
        mono = self.clock.monotonic()
        self._duties = [
            Duty("rescan", mono + self._rescan_every(), self._rescan),
            Duty("control", mono, self._control),
            Duty("status", mono, self._status),
            Duty("retention", mono + GC_FIRST, self._retention),
        ]
        if self.notifier.watchdog_interval is not None:
            self._duties.append(Duty("watchdog", mono, self._ping))
        log.info(
            "daemon started spool=%s cpus=%d policy=%s watch=%s sync=%s http=%s",
            self.spool.root,
            len(self.topology.cpus),
            cfg.policy,
            "inotify" if self.watcher is not None else "poll",
            "syncfs" if self.syncfs else "fsync",
            self.http.address,
        )
        log.info("%s", self.owner.fence)
        return None

    def _make_parts(self) -> None:
        cfg = self.config
        self.executor = LocalExecutor(
            reactor=self.reactor,
            on_result=self._deliver,
            kill_grace=cfg.kill_grace,
            log_limit=cfg.log_limit,
            max_workers=len(self.topology.cpus),
            clock=self.clock,
            owner=self.owner,
        )
        self.syncfs = sync_roots(cfg, self.spool)
        self.engine = Engine(
            spool=self.spool,
            executor=self.executor,
            topology=self.topology,
            policy=cfg.policy,
            clock=self.clock,
            on_finished=self._finished,
            events=self.metrics,
            syncfs=self.syncfs,
            wake=self.reactor.wake,
        )
        self.intake = Intake(
            self.spool,
            cfg,
            node_cpus=len(self.topology.cpus),
            node_memory=self.topology.memory,
            clock=self.clock,
        )
        self.fires = Fires(
            self.spool,
            clock=self.clock,
            engine=self.engine,
            metrics=self.metrics,
            node=self.node,
            write_trouble=self.write_trouble,
        )
        self.admission = Admission(
            self.spool,
            self.intake,
            self.engine,
            self.metrics,
            post=self.reactor.post,
            on_scheduled=self._scheduled,
        )
        self.requests = Requests(
            self.spool,
            clock=self.clock,
            engine=self.engine,
            metrics=self.metrics,
            config=lambda: self.config,
            node=self.node,
            unschedule=self.fires.remove,
        )
        self.status = Status(
            self.spool,
            clock=self.clock,
            started_at=self.started_at,
            engine=self.engine,
            fires=self.fires,
            metrics=self.metrics,
            notifier=self.notifier,
            config=lambda: self.config,
            topology=lambda: self.topology,
            http=self.http,
        )
        self.reports = Reports(self.engine)
        self.retention = Retention(self.spool, self.engine)

    def close(self) -> None:
        """Stop everything the daemon started: running tasks are ended (their runs stopped,
        or interrupted under `on_restart: fail`), writes made durable, the lock released."""
        if self.http is not None:
            self.http.close()
        if self.watcher is not None:
            self.reactor.unregister(self.watcher.fileno())
            self.watcher.close()
            self.watcher = None
        if hasattr(self, "engine"):
            self.admission.close()
            self.executor.close()
            resumes = self.config.on_restart == "resume"
            left = self.engine.interrupt(resumes=resumes)
            self.engine.close()
            self.reactor.wait(0)  # what the writer thread posted: ended runs, handovers
            self.reports.write(budget=10.0)
            if left:
                log.warning(
                    "stopped with %d run(s) unfinished: %s; %s",
                    len(left),
                    ", ".join(r.run_id for r in left[:10]),
                    "they resume at next start (stopped)"
                    if resumes
                    else "they are over (interrupted; on_restart: fail)",
                )
        if self.owner is not None:
            self.owner.release()
        self.reactor.close()
        self._release_lock()
        log.info("daemon stopped")

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the loop --------------------------------------------------------------------------

    def step(self, now: float) -> float:
        """One turn of the loop at `now` (monotonic): what is due, bounded; returns the
        seconds until the next duty (0: more work is waiting)."""
        self.last_tick = now
        self._count_write_trouble()
        if self.stop_asked and self._stop_deadline is None:
            self._begin_stop(now)
        if self._stop_deadline is not None and (
            self.engine.tasks_running == 0 or now >= self._stop_deadline
        ):
            self.done = True
            return 0.0
        if self.reload_asked:
            self.reload_asked = False
            reloading.reload(self)
        stopping = self._stop_deadline is not None
        waits: list[float | None] = [self._run_duties(now, stopping)]
        if not stopping:
            self.fires.fire()
        waits.append(self.executor.tick(now))
        waits.append(self.engine.step())
        if not stopping:
            # Files are taken after the engine's step: tasks that can start are on their
            # cores first, and run while the loop reads and validates the next batch.
            self.admission.take_batch()
            if self.admission.waiting:
                waits.append(0.0)  # more files to take: only collect what is ready, then go on
            wake = self.fires.next_wakeup(self.clock.now())
            if wake is not None:
                waits.append(max(0.0, wake.timestamp() - self.clock.time()))
        else:
            assert self._stop_deadline is not None
            waits.append(self._stop_deadline - now)
        if not stopping and self.reports.due(now) and not self.admission.waiting:
            self.reports.write(budget=REPORT_BUDGET)
            if self.reports.due(now):
                waits.append(0.0)
        elif (report_at := self.reports.next_due()) is not None:
            waits.append(report_at - now)
        return max(0.0, min(w for w in waits if w is not None))

    def _run_duties(self, now: float, stopping: bool) -> float:
        """Run what is due; the seconds until the next duty."""
        for duty in self._duties:
            if stopping and duty.name in ("rescan", "control", "retention"):
                continue
            if now >= duty.due or (duty.name == "retention" and self.retention.changed):
                duty.due = now + duty.action(now)
        return min(d.due for d in self._duties) - now

    def _rescan(self, now: float) -> float:
        self.admission.rescan()
        self.fires.sync_with_folder()
        return self._rescan_every()

    def _rescan_every(self) -> float:
        """inotify misses little (rescan_interval is the safety net); a poll is all there is."""
        return self.config.rescan_interval if self.watcher is not None else POLL_INTERVAL

    def _control(self, now: float) -> float:
        self.requests.carry_out()
        return CONTROL_INTERVAL

    def _status(self, now: float) -> float:
        self.status.publish()
        return STATUS_INTERVAL

    def _ping(self, now: float) -> float:
        self.notifier.watchdog()
        interval = self.notifier.watchdog_interval
        assert interval is not None
        return interval

    def _retention(self, now: float) -> float:
        return self.retention.run(self.config, self.clock.time())

    def _begin_stop(self, now: float) -> None:
        self._stop_deadline = now + self.config.stop_timeout
        self.engine.draining = True
        self.notifier.stopping()
        log.info(
            "stopping: intake closed, giving %d running task(s) %.0fs",
            self.engine.tasks_running,
            self.config.stop_timeout,
        )

    # -- events ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload_asked = True
        else:
            self.stop_asked = True
        self.reactor.wake()

    def _watch(self) -> None:
        if self.config.watch != "auto":
            return
        try:
            self.watcher = Watcher(self.spool)
        except OSError as exc:
            log.error("%s; falling back to scans every %.0fs", exc, POLL_INTERVAL)
            return
        self.reactor.register(self.watcher.fileno(), self._on_inotify)

    def _on_inotify(self) -> None:
        assert self.watcher is not None
        names, deleted, overflowed = self.watcher.read()
        if self._stop_deadline is not None:
            return  # intake is closed: the next start's scan takes them
        self.admission.hint(names)
        for name in deleted:
            self.fires.remove(name.rsplit(".", 1)[0])
        if overflowed:
            self.metrics.inotify_overflowed()
            log.warning("inotify queue overflowed; rescanning incoming/")
            for duty in self._duties:
                if duty.name == "rescan":
                    duty.due = 0.0

    def _deliver(self, result: Result) -> None:
        self.engine.deliver(result)

    def _scheduled(self, outcome: Scheduled) -> None:
        self.fires.set(outcome.name, outcome.pipeline, outcome.spec_bytes, outcome.accepted_at)

    def _finished(self, run: ActiveRun) -> None:
        """In the writer thread, once a run's final run.json is durable."""
        # Handover: run.json says the run is over (durable); the queue copy can go. Here,
        # not on the loop: an unlink was 5% of the loop in a burst of runs.
        try:
            os.unlink(self.spool.queue / f"{run.run_id}.yaml")
        except FileNotFoundError:
            pass
        self.reactor.post(lambda: self._ended(run))

    def _ended(self, run: ActiveRun) -> None:
        """On the loop's thread: a run's end is durable."""
        self.reports.add(self.clock.monotonic(), run.dir)
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
        self.fires.run_ended(run.run_id)

    # -- health ----------------------------------------------------------------------------

    def node(self) -> tuple[int, int]:
        """The node's CPUs and memory, as the live config gives them."""
        return len(self.topology.cpus), self.topology.memory

    def write_trouble(self) -> OSError | None:
        """Why the spool cannot be written now (engine or intake), or None."""
        return self.engine.write_error or self.intake.write_error

    def _count_write_trouble(self) -> None:
        err = self.write_trouble()
        self.metrics.spool_writes(err is not None, err is not None and err is not self._write_error)
        self._write_error = err

    def _health(self) -> str | None:
        """For /healthz (the HTTP thread). The loop never waits longer than STATUS_INTERVAL:
        the status duty is always one of its wake-ups."""
        trouble = self.write_trouble() if hasattr(self, "engine") else None
        return health(self.clock.monotonic(), self.last_tick, STATUS_INTERVAL, trouble)
