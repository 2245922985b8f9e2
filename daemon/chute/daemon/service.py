"""The daemon: its parts, its loop (one `step` at a time), start and stop.

Owns: making and wiring the daemon's parts, the loop (`step(mono)` does a bounded turn of
work and returns the seconds until its next duty; `run` waits that long in the reactor),
its duties on timers (rescans, control requests, status, the watchdog, retention), the
stop (SIGTERM: intake closed, running tasks get `stop_timeout`), signals and reload
requests. Not here: each part's own work: taking files (chute.daemon.admission,
chute.intake.drops), noticing them (chute.daemon.watch), schedules (chute.daemon.fires),
control requests (chute.daemon.requests), recovery (chute.daemon.recovery), what follows a
run's end (chute.daemon.ends), status (chute.daemon.status), reports and retention
(chute.daemon.upkeep), reload (chute.daemon.reload), runs (chute.engine), processes
(chute.execution.local).
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
from chute.engine.loop import Engine
from chute.execution import owners
from chute.execution.local import LocalExecutor
from chute.intake.decision import Scheduled
from chute.intake.drops import Intake
from chute.observe import logs
from chute.observe.http import HttpError, Server, read_token, serve
from chute.observe.metrics import Metrics
from chute.observe.notify import Notifier
from chute.reactor import Reactor
from chute.store.spool import Spool, sync_roots

from . import reload as reloading
from .admission import Admission
from .ends import RunEnds
from .fires import Fires
from .lock import acquire_lock, unwritable
from .recovery import recover
from .reload import topology_of
from .requests import Requests
from .status import Health, Status
from .upkeep import GC_FIRST, Reports, Retention
from .watch import Watch

log = logging.getLogger(__name__)

EXIT_CANNOT_START = 2
"""A bad config or an unusable spool: restarting cannot fix it (systemd/chute.service has
RestartPreventExitStatus=2), and `chute` uses 2 for usage and input errors anyway."""


@dataclass(slots=True)
class Duty:
    """Work due at `due` (monotonic seconds); `action()` does it and returns the seconds
    until it is due again."""

    name: str
    due: float
    action: Callable[[], float]


class Daemon:
    """`run()` serves until SIGTERM. Tests drive it in-process: `open()`, then `step(mono)`
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
        self.health = Health(self.clock, self.metrics)
        self.done = False  # the loop has ended (stopped)
        self.stop_asked = False
        self.reload_asked = False
        self._lock_fd: int | None = None
        self._stop_deadline: float | None = None
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
                health=self.health.answer,
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
        self.watch.start(cfg.watch)
        self.admission.rescan()  # taken in batches by the loop, after READY=1
        mono = self.clock.monotonic()
        self._duties = [
            Duty("rescan", mono + self.watch.scan_every(cfg.rescan_interval), self._rescan),
            Duty("control", mono, self.requests.carry_out),
            Duty("status", mono, self.status.publish),
            Duty("retention", mono + GC_FIRST, self._retention),
        ]
        if self.notifier.watchdog_interval is not None:
            self._duties.append(Duty("watchdog", mono, self._ping))
        log.info(
            "daemon started spool=%s cpus=%d policy=%s watch=%s sync=%s http=%s",
            self.spool.root,
            len(self.topology.cpus),
            cfg.policy,
            self.watch.kind,
            "syncfs" if self.syncfs else "fsync",
            self.http.address,
        )
        log.info("%s", self.owner.fence)
        return None

    def _make_parts(self) -> None:
        cfg = self.config
        self.executor = LocalExecutor(
            reactor=self.reactor,
            on_result=lambda result: self.engine.deliver(result),  # the engine is made next
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
            on_finished=lambda run: self.ends.durable(run),
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
            write_trouble=self.health.write_trouble,
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
        self.health.follow(self.engine, self.intake)
        self.reports = Reports(self.engine)
        self.retention = Retention(self.spool, self.engine)
        self.ends = RunEnds(
            self.spool,
            clock=self.clock,
            post=self.reactor.post,
            reports=self.reports,
            metrics=self.metrics,
            ended=self.fires.run_ended,
        )
        self.watch = Watch(
            self.spool,
            self.reactor,
            self.metrics,
            hint=self.admission.hint,
            unschedule=self.fires.remove,
        )

    def close(self) -> None:
        """Stop everything the daemon started: running tasks are ended (their runs stopped,
        or interrupted under `on_restart: fail`), writes made durable, the lock released."""
        if self.http is not None:
            self.http.close()
        if hasattr(self, "engine"):
            self.watch.close()
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

    def step(self, mono: float) -> float:
        """One turn of the loop at `mono` (monotonic seconds): what is due, bounded; returns
        the seconds until the next duty (0: more work is waiting)."""
        self.health.tick(mono)
        if self.stop_asked and self._stop_deadline is None:
            self._begin_stop(mono)
        if self._stop_deadline is not None and (
            self.engine.tasks_running == 0 or mono >= self._stop_deadline
        ):
            self.done = True
            return 0.0
        if self.reload_asked:
            self.reload_asked = False
            reloading.reload(self)
        stopping = self._stop_deadline is not None
        waits: list[float | None] = [self._run_duties(mono, stopping)]
        if not stopping:
            self.fires.fire()
        waits.append(self.executor.tick(mono))
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
            waits.append(self._stop_deadline - mono)
        waits.append(self.reports.turn(mono, idle=not stopping and not self.admission.waiting))
        return max(0.0, min(w for w in waits if w is not None))

    def _run_duties(self, mono: float, stopping: bool) -> float:
        """Run what is due; the seconds until the next duty."""
        for duty in self._duties:
            if stopping and duty.name in ("rescan", "control", "retention"):
                continue
            if (
                mono >= duty.due
                or (duty.name == "retention" and self.retention.changed)
                or (duty.name == "rescan" and self.watch.overflowed)
            ):
                duty.due = mono + duty.action()
        return min(d.due for d in self._duties) - mono

    def _rescan(self) -> float:
        self.watch.overflowed = False
        self.admission.rescan()
        self.fires.sync_with_folder()
        return self.watch.scan_every(self.config.rescan_interval)

    def _ping(self) -> float:
        self.notifier.watchdog()
        interval = self.notifier.watchdog_interval
        assert interval is not None
        return interval

    def _retention(self) -> float:
        return self.retention.run(self.config, self.clock.time())

    def _begin_stop(self, mono: float) -> None:
        self._stop_deadline = mono + self.config.stop_timeout
        self.engine.draining = True
        self.watch.closed = True
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

    def _scheduled(self, outcome: Scheduled) -> None:
        self.fires.set(outcome.name, outcome.pipeline, outcome.spec_bytes, outcome.accepted_at)

    # -- the node --------------------------------------------------------------------------

    def node(self) -> tuple[int, int]:
        """The node's CPUs and memory, as the live config gives them."""
        return len(self.topology.cpus), self.topology.memory
