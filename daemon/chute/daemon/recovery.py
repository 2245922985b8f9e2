"""Start-up recovery: what a stop or a crash left, put right before anything runs.

Owns: the order of recovery (temp leftovers, interrupted intake and rejected requests,
schedules, then each run of queue/) and containing a failure to what it concerns. Not here:
what recovery decides for one run (chute.engine.recovery.recover), for one claim
(chute.intake.recovery), what a dead owner left running (chute.execution.leftovers, done
before this).
Crash safety: an accepted run is known by its queue/<run_id>.yaml, removed only after the
run's final run.json is durable, so queue/ lists exactly the runs to resume: queued ones
start, stopped or running ones resume in place from their finished stages (output.json
done-marks) or end interrupted (`on_restart: fail`), cancelled ones end cancelled, finished
ones just lose their queue file. Recovery itself may be cut short by another crash at any
point: each step is redone or found done at the next start.
Diagnostics: a run, schedule or claim that cannot be recovered is failed or set aside with
one line (a traceback for a chute bug), and the daemon starts anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from chute.clock import Clock
from chute.engine import recovery
from chute.engine.loop import Engine
from chute.engine.runs import Unrecoverable
from chute.intake import control
from chute.intake.decision import Outcome
from chute.intake.drops import Intake
from chute.observe.metrics import Metrics
from chute.spec import SpecError
from chute.store import atomic, queue
from chute.store.spool import Spool

from .fires import Fires

log = logging.getLogger(__name__)


def recover(
    spool: Spool,
    *,
    clock: Clock,
    on_restart: str,
    intake: Intake,
    fires: Fires,
    engine: Engine,
    metrics: Metrics,
    node: tuple[int, int],
    take: Callable[[Outcome], None],
) -> None:
    """At start: finish interrupted intake, load schedules, then each run of queue/. A
    step that fails for one file or run is contained to it, and the daemon starts anyway.
    `take(outcome)`: what intake finished (a schedule, a rejection)."""
    for folder in (spool.queue, spool.schedules, spool.control):
        atomic.remove_temp_leftovers(folder)
    try:
        outcomes = intake.recover()
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
        control.repair(spool, clock.now())
    except OSError as exc:
        log.error("rejected/: cannot repair rejected requests: %s", exc)
    for outcome in outcomes:
        try:
            take(outcome)
        except Exception:
            log.exception("taking %s after a restart failed (a chute bug)", outcome)
    fires.load()
    resumed = interrupted = 0
    cpus, memory = node
    for run_id in queue.run_ids(spool):
        try:
            got = recovery.recover(
                spool,
                run_id,
                on_restart=on_restart,
                wall=clock.time(),
                node_cpus=cpus,
                node_memory=memory,
            )
        except Exception as exc:  # noqa: BLE001 (contained to this run; logged there)
            _failed(spool, run_id, exc, clock, metrics)
            continue
        if got.state == "interrupted":
            interrupted += 1
            metrics.run_finished("interrupted", None)
        if got.run is None:
            continue
        resumed += got.started and not got.cancel
        fires.track(got.run)
        engine.add(got.run)
        if got.cancel:
            log.info("%s cancel requested before the stop: ending it cancelled", run_id)
            engine.cancel(run_id)
    if resumed or interrupted:
        log.warning(
            "recovered after a stop or crash: %d run(s) resumed, %d marked interrupted",
            resumed,
            interrupted,
        )


def _failed(spool: Spool, run_id: str, exc: Exception, clock: Clock, metrics: Metrics) -> None:
    """Called in an except block: end the run recovery could not resume (failed, or its
    queue file set aside) and say so in one line, with a traceback for a chute bug."""
    reason = reason_of(exc)
    try:
        marked = recovery.recovery_failed(spool, run_id, reason, clock.time())
    except OSError as err:
        outcome = (
            f"and its queue file cannot be set aside ({err.strerror}): it is tried again "
            "at the next start"
        )
    else:
        if marked:
            metrics.run_finished("failed", None)
            outcome = "marked failed"
        else:
            outcome = (
                f"its run.json cannot be written, so {queue.name(run_id)} is set aside as "
                f"{queue.name(run_id)}{queue.ASIDE_SUFFIX}: look at runs/{run_id}/"
            )
    if isinstance(exc, Unrecoverable | SpecError | OSError | ValueError):
        log.error("%s recovery failed: %s; %s", run_id, reason, outcome)
    else:
        log.exception("%s recovery failed (a chute bug): %s; %s", run_id, reason, outcome)


def reason_of(exc: Exception) -> str:
    """One line for what went wrong: the path and errno text, a spec's issues, or the
    message."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if isinstance(exc, SpecError):
        return "; ".join(str(i) for i in exc.issues)
    return str(exc) or type(exc).__name__
