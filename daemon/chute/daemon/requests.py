"""Carrying out the requests in control/: cancel, retry, unschedule.

Owns: what each request does to the daemon's runs and schedules, and what becomes of a
request that cannot be carried out (rejected, or kept for a later pass). Not here: reading
and checking a request, who may make it, and moving it to rejected/ (chute.intake.control);
making a retry's run (chute.engine.retry).
Crash safety: a request's effect is durable before its file is removed (a cancel as
runs/<id>/cancel.json, a retry as its run's folder and queue file, an unschedule as the
schedule file's removal, synced), so a request a crash interrupts is carried out once at
the next start: a replay is a no-op or finishes the work.
Diagnostics: a bad or refused request goes to rejected/ with its reason and one WARNING
line (chute.intake.control); the environment (a full disk) is one ERROR line per request and
errno, and the request waits; a chute bug is a traceback, and the request is left until
the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from chute.clock import Clock
from chute.config import Config
from chute.engine import recovery, retry
from chute.engine.loop import Engine
from chute.engine.runs import submitter
from chute.intake import control
from chute.observe.metrics import Metrics
from chute.store import queue
from chute.store.spool import Spool

log = logging.getLogger(__name__)

CONTROL_INTERVAL = 0.25  # seconds between passes over control/


class Requests:
    """The daemon's side of control/: one pass carries out what is there."""

    def __init__(
        self,
        spool: Spool,
        *,
        clock: Clock,
        engine: Engine,
        metrics: Metrics,
        config: Callable[[], Config],
        node: Callable[[], tuple[int, int]],
        unschedule: Callable[[str], None],
    ) -> None:
        """`config()`: the live config (who may act: chute.intake.control.authorize); `node()`:
        the node's CPUs and memory; `unschedule(name)`: drop a schedule the daemon holds."""
        self.spool = spool
        self.clock = clock
        self.engine = engine
        self.metrics = metrics
        self.config = config
        self.node = node
        self.unschedule = unschedule
        self._held: set[str] = set()  # requests a chute bug left: tried at next start
        self._trouble: dict[str, int | None] = {}  # request -> errno logged for it

    def carry_out(self) -> float:
        """Carry out the requests in control/: each request's effect is durable before its
        file goes; a bad one, or one whose requester may not make it (control.authorize),
        goes to rejected/; one that cannot be carried out yet (a full disk, a run not
        handed to the engine yet) waits. Returns the seconds until the next pass."""
        pending = control.pending(self.spool)
        for name in set(self._trouble) - set(pending):
            del self._trouble[name]
        for name in pending:
            if name in self._held:
                continue
            try:
                request, requester = control.read(self.spool, name)
            except control.BadRequest as exc:
                self._reject(name, exc)
                continue
            except FileNotFoundError:
                continue  # gone meanwhile: a benign race
            except OSError as exc:
                self._failed(name, exc)
                continue
            try:
                control.authorize(self.spool, request, requester, self.config())
                done = self._do(request, requester)
            except control.BadRequest as exc:
                self._reject(name, exc)
                continue
            except OSError as exc:
                self._failed(name, exc)
                continue
            except Exception:
                log.exception("control/%s: failed (a chute bug); left until the next start", name)
                self._held.add(name)
                continue
            self._trouble.pop(name, None)
            if done:
                control.finish(self.spool, name)
        return CONTROL_INTERVAL

    def _failed(self, name: str, exc: OSError) -> None:
        """The environment (a full disk, permissions): one ERROR line per request and errno;
        the request stays in control/ and is tried again at each pass."""
        if self._trouble.get(name) != exc.errno:
            log.error(
                "control/%s: cannot carry it out: %s: %s (errno %s); it waits and is retried: "
                "free space or fix permissions on the spool",
                name,
                exc.filename or self.spool.root,
                exc.strerror,
                exc.errno,
            )
        self._trouble[name] = exc.errno

    def _reject(self, name: str, exc: control.BadRequest) -> None:
        self._trouble.pop(name, None)
        try:
            control.reject(self.spool, name, exc, self.clock.now())
        except FileNotFoundError:
            return
        except OSError as err:
            log.error("control/%s: cannot move it to rejected/: %s", name, err.strerror)
            self._held.add(name)
            return
        self.metrics.file_rejected(exc.reason)

    def _do(self, request: control.Request, requester: int) -> bool:
        """Do what `request` asks, durably; False when it must wait for a later pass."""
        if isinstance(request, control.Cancel):
            return self._cancel(request.run)
        if isinstance(request, control.Retry):
            self._retry(request, requester)
            return True
        if control.unschedule_file(self.spool, request.name):
            log.info("schedule %s unscheduled by request", request.name)
        self.unschedule(request.name)
        return True

    def _cancel(self, run_id: str) -> bool:
        run_dir = self.spool.runs / run_id
        if run_id in self.engine.runs:
            # Handover: the mark is durable before the cancel is acted on, so a restart ends
            # the run cancelled rather than resuming it.
            recovery.mark_cancelled(run_dir, self.clock.time())
            self.engine.cancel(run_id)
            log.info("%s cancel requested", run_id)
            return True
        if queue.exists(self.spool, run_id) and not recovery.finished_on_disk(run_dir):
            return False  # accepted, not handed to the engine yet: the next pass cancels it
        log.info("%s cancel requested but the run is not active", run_id)
        return True

    def _retry(self, request: control.Retry, requester: int) -> None:
        cpus, memory = self.node()
        try:
            plan = retry.plan_retry(
                self.spool.runs / request.run,
                request.from_stage,
                node_cpus=cpus,
                node_memory=memory,
            )
            run = retry.make_retry(  # the retry is its requester's run, as `chute run` is
                self.spool,
                plan,
                now=self.clock.now(),
                new_id=request.new_run_id,
                queue_file=True,
                submitted_by=submitter(requester),
            )
        except retry.RetryRefused as exc:
            if retry.abandon_retry(
                self.spool, request.new_run_id, request.run, str(exc), self.clock.time()
            ):
                log.warning("%s ended failed: its retry cannot be finished", request.new_run_id)
            raise control.BadRequest("bad_request", "", f"retry refused: {exc}") from None
        if run is None:
            return  # made before a crash: queued (recovery resumed it) or run since
        self.engine.add(run)
        log.info("%s retry of %s keeps %d stage(s)", run.run_id, plan.old_id, len(plan.reused))
