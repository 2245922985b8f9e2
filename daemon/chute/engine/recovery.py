"""A run that ends or resumes outside the engine's loop: what start-up does with one run of
queue/, a recorded cancel, and settling the manifest of a run that ends that way.

Owns: the recovery decision for one queued run (resume it, end it interrupted, or find it
over), ending a run recovery cannot resume, a run's cancel mark (runs/<id>/cancel.json),
cancelling a run no process drives, and reading from disk whether a run had started or is
over. Not here: the order of start-up (chute.daemon.recovery), rebuilding the run to drive
(chute.engine.runs.resume_run), the queue file (chute.store.queue).
Crash safety: a cancel is durable as runs/<id>/cancel.json before the daemon acts on it;
recovery ends such a run cancelled instead of resuming it. A run that ends here gets its
manifest settled (settle_manifest: nothing left running, every attempt ended), then its
final run.json, and only then loses its queue file; a crash in between leaves a final
run.json with its queue file, which the next start just removes. Each step is redone or
found done at the next start.
Diagnostics: Unrecoverable (chute.engine.runs) carries one line that says what is wrong.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chute import names
from chute.clock import rfc3339
from chute.engine.runs import ActiveRun, Unrecoverable, resume_run, run_record
from chute.engine.stage import STAGE_FINAL, UNIT_FINAL
from chute.store import atomic, queue, rundir
from chute.store.spool import Spool

log = logging.getLogger(__name__)

CANCEL_MARK = "cancel.json"


@dataclass(frozen=True, slots=True)
class Recovery:
    """What start-up does with one run of queue/.

    `run` None: nothing to drive (it had finished, or on_restart: fail ended it
    `interrupted`, its manifest settled, as `state` says); else the run to hand to the
    engine, `started` when it had started (running or stopped: a resume, counted in
    `recoveries`), `cancel` when a cancel was recorded
    for it (the engine ends it cancelled instead of running it)."""

    state: str
    run: ActiveRun | None = None
    started: bool = False
    cancel: bool = False


def recover(
    spool: Spool,
    run_id: str,
    *,
    on_restart: str,
    wall: float,
    node_cpus: int | None,
    node_memory: int | None,
) -> Recovery:
    """Decide and prepare what start-up does with queue/<run_id>.yaml (chute.daemon calls
    this for each). Raises Unrecoverable (or SpecError, OSError) when the run cannot be
    resumed: the caller ends it with recovery_failed()."""
    if not names.is_run_id(run_id):
        raise Unrecoverable(f"{queue.name(run_id)} is not named by a run id")
    folder = spool.runs / run_id
    rec = run_record(folder)
    state = rec["state"]
    # An `interrupted` run with its queue file and no finished_at was stopped by a chute
    # before `stopped` existed: it resumes like one.
    if state in ("succeeded", "failed", "cancelled") or (
        state == "interrupted" and rec.get("finished_at")
    ):
        queue.remove(spool, run_id)  # finished before the crash; only the queue file was left
        return Recovery(state)
    cancel = cancel_marked(folder)
    started = state != "queued" or started_on_disk(folder)
    if started and on_restart == "fail" and not cancel:
        reason = "the daemon stopped during the run (on_restart: fail)"
        settle_manifest(folder, reason, wall)
        rec["state"] = "interrupted"
        rec["error"] = reason
        rec["finished_at"] = rfc3339(wall)
        # Handover: run.json says the run is over; its queue file may go.
        atomic.write_json(folder / "run.json", rec)
        queue.remove(spool, run_id)
        return Recovery("interrupted")
    run = resume_run(spool, run_id, node_cpus=node_cpus, node_memory=node_memory)
    if started and not cancel:
        run.record["recoveries"] = int(rec.get("recoveries") or 0) + 1
        run.record["state"] = "running"
        run.record["started_at"] = rec.get("started_at") or rfc3339(wall)
        run.record["error"] = None
        run.record["finished_at"] = None
        atomic.write_json(run.dir / "run.json", run.record)
    return Recovery(str(run.record["state"]), run, started=started, cancel=cancel)


def recovery_failed(spool: Spool, run_id: str, reason: str, wall: float) -> bool:
    """End a run recovery could not resume: run.json says failed with `error: "recovery
    failed: <reason>"` (cancelled, when a cancel was recorded), then its queue file goes.
    False when run.json cannot be written (missing, not an object, not writable): then the
    queue file is set aside (chute.store.queue.set_aside), so no restart loops on it."""
    try:
        if not names.is_run_id(run_id):
            raise Unrecoverable("not a run id")
        folder = spool.runs / run_id
        rec = run_record(folder)
        if cancel_marked(folder):
            rec.update(state="cancelled", error="cancelled")
        else:
            rec.update(state="failed", error=f"recovery failed: {reason}")
        rec["finished_at"] = rfc3339(wall)
        try:
            settle_manifest(folder, str(rec["error"]), wall)
        except OSError as exc:  # the manifest may be what recovery could not use
            log.warning("%s: manifest not settled: %s", run_id, _why(exc))
        atomic.write_json(folder / "run.json", rec)
    except (Unrecoverable, OSError):
        queue.set_aside(spool, run_id)
        return False
    queue.remove(spool, run_id)
    return True


def mark_cancelled(run_dir: Path, wall: float) -> None:
    """Record durably that the run is to be cancelled (runs/<id>/cancel.json), before the
    cancel is acted on: a restart then ends the run cancelled instead of resuming it."""
    if not os.path.lexists(run_dir / CANCEL_MARK):
        atomic.write_json(run_dir / CANCEL_MARK, {"requested_at": rfc3339(wall)})


def cancel_marked(run_dir: Path) -> bool:
    return os.path.lexists(run_dir / CANCEL_MARK)


def cancel_stopped(spool: Spool, run_id: str, wall: float) -> dict[str, Any]:
    """Cancel a run no process drives (no daemon runs): run.json says cancelled (durable),
    then its queue file goes. Returns the run.json written."""
    folder = spool.runs / names.run_id(run_id)
    record = rundir.read_json(folder / "run.json")
    record.update(state="cancelled", error="cancelled", finished_at=rfc3339(wall))
    settle_manifest(folder, "cancelled", wall)  # a stopped run's, before run.json says over
    # Handover: run.json says the run is over; the queue file may go (recovery drops it).
    atomic.write_json(folder / "run.json", record)
    queue.remove(spool, run_id)
    return dict(record)


def end_unqueued(spool: Spool, run_id: str, source: str, reason: str, wall: float) -> bool:
    """End a run that was made (run.json queued) but never queued, and that nothing will
    queue any more (the schedule whose fire made it is gone): run.json says cancelled, with
    `reason`. Only a run of `source` (its trigger's source) in that state is touched; False
    when there is none."""
    folder = spool.runs / names.run_id(run_id)
    try:
        record = rundir.read_json(folder / "run.json")
    except FileNotFoundError:
        return False
    if (
        not isinstance(record, dict)
        or record.get("state") != "queued"
        or not isinstance(record.get("trigger"), dict)
        or record["trigger"].get("source") != source
        or queue.exists(spool, run_id)
    ):
        return False
    record.update(state="cancelled", error=reason, finished_at=rfc3339(wall))
    atomic.write_json(folder / "run.json", record)
    return True


def started_on_disk(run_dir: Path) -> bool:
    """Whether a run that run.json still calls `queued` had started: run.json turns `running`
    only with the run's first manifest (chute.engine.writes: soon after its first task), so a
    crash can come first. The mark is a stage folder without its output.json: made before
    its task started, and never by anything else (a retry's kept stages have theirs, and
    their copies in progress have dot-names)."""
    try:
        with os.scandir(run_dir / "stages") as entries:
            return any(
                not e.name.startswith(".")
                and e.is_dir(follow_symlinks=False)
                and not os.path.lexists(os.path.join(e.path, "output.json"))
                for e in entries
            )
    except (FileNotFoundError, NotADirectoryError):
        return False


def finished_on_disk(run_dir: Path) -> bool:
    """Whether the run's run.json says it is over (an unreadable one: not)."""
    try:
        return rundir.read_json(run_dir / "run.json").get("state") in rundir.FINAL_RUN_STATES
    except (OSError, ValueError, AttributeError):
        return False


def settle_manifest(run_dir: Path, reason: str, wall: float) -> bool:
    """Make the manifest of a run that ends outside the engine (recovery, a cancel without
    a daemon) agree with the final run.json that follows: every attempt left open ends at
    `wall` with `reason`, and every stage and shard not final ends `cancelled` (a stage
    that had not ended did not end on its own). Durable before it returns; a missing
    manifest, or one not as chute writes it, is left alone. True when it was rewritten."""
    try:
        manifest = rundir.read_json(run_dir / "manifest.json")
    except (OSError, ValueError):  # none yet, or a task put something else in its place
        return False
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(stages, list):
        return False
    when = rfc3339(wall)
    changed = False

    def settle(entry: dict[str, Any], final: frozenset[str]) -> None:
        nonlocal changed
        for attempt in entry.get("attempts") or []:
            if isinstance(attempt, dict) and attempt.get("finished_at") is None:
                attempt["finished_at"] = when
                attempt["error"] = attempt.get("error") or reason
                changed = True
        if entry.get("state") not in final:
            entry["state"] = "cancelled"
            entry["finished_at"] = entry.get("finished_at") or when
            entry["output"] = None
            changed = True

    for entry in stages:
        if not isinstance(entry, dict):
            continue
        settle(entry, STAGE_FINAL)
        for shard in entry.get("shards") or []:
            if isinstance(shard, dict):
                settle(shard, UNIT_FINAL)
    if changed:
        atomic.write_json(run_dir / "manifest.json", manifest)
    return changed


def _why(exc: Exception) -> str:
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
