"""`chute retry`: a new run from an old one, keeping the old run's finished stages.

Owns: whether a run can be retried and what the retry keeps of it (RetryPlan), making the
retry's run (chute.engine.runs.make_run) with the kept stages copied in, and ending a retry
that cannot be finished. Not here: the run folder (chute.store.rundir), the queue file
(chute.store.queue), the request that asks for it (chute.intake.control, chute.daemon.requests).
Crash safety: the new run records what it retries (trigger {"type": "retry", "source": <old
id>}); its kept stages are copied in, each whole or not at all, their outputs' paths moved
to the new run (chute.engine.copies: the new run never needs the old folder); then
queue/<new id>.yaml is written. A retry replayed after a crash (same new run id) finds that
run, copies what is missing and writes the queue file; once the queue file exists,
recovery resumes the run and a replay changes nothing. No error path removes a run folder.
Diagnostics: RetryRefused carries one line that says what is wrong.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from chute import names
from chute.clock import rfc3339
from chute.engine import runs
from chute.engine.copies import copy_reused, origins
from chute.engine.stage import Reused
from chute.spec import SpecError, load_bytes
from chute.spec.model import Pipeline
from chute.store import atomic, queue, rundir, taskfiles
from chute.store.outputs import relocate, stored_hash
from chute.store.spool import Spool

log = logging.getLogger(__name__)

REUSABLE = ("succeeded", "cached")


class RetryRefused(Exception):
    """A retry that cannot be made as asked (an unreadable or unfinished run, an unknown
    stage, a run id taken by another run): str() is one line for the user."""


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """What a retry of `old_id` makes: checked, before anything is written."""

    old_id: str
    old_dir: Path
    old: dict[str, Any]  # its run.json
    pipeline: Pipeline
    raw: bytes  # its spec.yaml, the new run's too
    reused: dict[str, Reused]


def plan_retry(
    old_dir: Path, from_stage: str | None, *, node_cpus: int | None, node_memory: int | None
) -> RetryPlan:
    """Check that the run in `old_dir` can be retried (from `from_stage`), and what the
    retry keeps of it; RetryRefused says why not."""
    old_id = old_dir.name
    try:
        old = rundir.read_json(old_dir / "run.json")
    except FileNotFoundError:
        raise RetryRefused(f"{old_id}: no such run (its folder or run.json is gone)") from None
    except (OSError, ValueError) as exc:
        raise RetryRefused(f"{old_id}: cannot read its run.json: {_why(exc)}") from None
    if not isinstance(old, dict):
        raise RetryRefused(f"{old_id}: its run.json is not a JSON object")
    if old.get("state") not in rundir.FINAL_RUN_STATES:  # queued, running, or stopped
        raise RetryRefused(f"{old_id}: still {old.get('state')}; retry it once it has ended")
    display = f"runs/{old_id}/spec.yaml"
    try:
        raw = (old_dir / "spec.yaml").read_bytes()
        pipeline = load_bytes(raw, display, node_cpus=node_cpus, node_memory=node_memory)
    except OSError as exc:
        raise RetryRefused(f"{display}: cannot read: {_why(exc)}") from None
    except SpecError as exc:
        raise RetryRefused("\n".join(str(i) for i in exc.issues)) from None
    if from_stage is not None and from_stage not in {s.name for s in pipeline.stages}:
        stages = ", ".join(s.name for s in pipeline.stages)
        raise RetryRefused(f"--from {from_stage}: no such stage in {old_id} (stages: {stages})")
    reused = reusable_stages(old_dir, pipeline, from_stage)
    return RetryPlan(old_id, old_dir, old, pipeline, raw, reused)


def make_retry(
    spool: Spool,
    plan: RetryPlan,
    *,
    now: datetime,
    new_id: str | None = None,
    queue_file: bool = False,
    submitted_by: dict[str, Any] | None = None,
) -> runs.ActiveRun | None:
    """The new run of `plan`: its folder (state queued, trigger retry of plan.old_id), the
    kept stages copied in, and with `queue_file` its queue/<id>.yaml (the daemon's runs);
    `submitted_by` is whose run it is (default: this process's user).

    Replayed with the same `new_id` after a crash, it finds the run it made and finishes
    it; None when nothing is left to do (queued already: recovery has it, or it ran).
    RetryRefused when `new_id` is another run's."""
    new_id = new_id or rundir.new_run_id(now)
    folder = spool.runs / names.run_id(new_id)
    trigger = {"type": "retry", "source": plan.old_id}
    # The kept stages' data names files of the new run, where they are copied: the new run
    # never needs the old one's folder (retention may remove it).
    kept = {
        name: Reused(r.entry, relocate(r.data, origins(plan.old_dir), str(folder)), r.output_hash)
        for name, r in plan.reused.items()
    }
    record = _record_if_made(folder)
    if record is None:
        new = runs.new_run(
            plan.pipeline,
            plan.raw,
            trigger=trigger,
            now=now,
            run_date=plan.old.get("run_date"),
            run_id=new_id,
            resumed_from=plan.old_id,
            reused=kept,
            submitted_by=submitted_by,
        )
        run = runs.make_run(spool, new)
    else:
        if record.get("trigger") != trigger:
            raise RetryRefused(f"{new_id}: that run id is taken by another run")
        if record.get("state") != "queued" or queue.exists(spool, new_id):
            return None
        log.info("%s finishing the retry of %s a crash interrupted", new_id, plan.old_id)
        run = runs.active_run(spool, record, plan.pipeline, kept)
    copy_reused(plan.old_dir, folder, list(plan.reused), run_id=new_id)
    if queue_file:
        # Handover: the queue file makes the run known to recovery; until it exists, a
        # replayed request finishes the run instead.
        queue.make(spool, new_id, plan.raw)
    return run


def abandon_retry(spool: Spool, new_id: str, old_id: str, reason: str, wall: float) -> bool:
    """A retry request that cannot be carried out any more (its old run is gone since): if
    a crash left its run half made (queued, no queue file), end that run failed with the
    reason, so the id the CLI printed does not stay queued for ever."""
    folder = spool.runs / names.run_id(new_id)
    record = _record_if_made(folder)
    if (
        record is None
        or record.get("trigger") != {"type": "retry", "source": old_id}
        or record.get("state") != "queued"
        or queue.exists(spool, new_id)
    ):
        return False
    record.update(state="failed", error=f"retry not finished: {reason}", finished_at=rfc3339(wall))
    atomic.write_json(folder / "run.json", record)
    return True


def _record_if_made(folder: Path) -> dict[str, Any] | None:
    """run.json of the run in `folder`, None when there is none (a folder without one is
    half made, and chute.engine.runs.make_run makes it again)."""
    try:
        record = rundir.read_json(folder / "run.json")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RetryRefused(f"{folder.name}: run id taken; its run.json: {_why(exc)}") from None
    if not isinstance(record, dict):
        raise RetryRefused(f"{folder.name}: run id taken; its run.json is not a JSON object")
    return record


def _why(exc: Exception) -> str:
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


def downstream(pipeline: Pipeline, stage: str) -> set[str]:
    """`stage` and every stage that depends on it, directly or not."""
    out = {stage}
    for s in pipeline.stages:  # topological order: dependencies come first
        if any(d in out for d in s.depends_on):
            out.add(s.name)
    return out


def reusable_stages(old_dir: Path, pipeline: Pipeline, rerun_from: str | None) -> dict[str, Reused]:
    """Stages of the run in `old_dir` whose outputs a retry keeps: those that succeeded (or
    were cached), less `rerun_from` and what depends on it, and less anything downstream of a
    stage that is run again. A manifest or output.json that is missing or not as chute
    writes it keeps nothing of that stage (it runs again)."""
    entries = _manifest_entries(old_dir)
    rerun: set[str] = downstream(pipeline, rerun_from) if rerun_from else set()
    keep: dict[str, Reused] = {}
    for s in pipeline.stages:
        entry = entries.get(s.name)
        redo = s.name in rerun or any(d not in keep for d in s.depends_on)
        if redo or entry is None or entry.get("state") not in REUSABLE:
            rerun.add(s.name)
            continue
        doc = _output_doc(old_dir, s.name)
        if doc is None:
            rerun.add(s.name)
            continue
        keep[s.name] = Reused(entry=entry, data=doc.get("data"), output_hash=stored_hash(doc))
    return keep


def _manifest_entries(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The manifest's stage entries by name ({} without a usable manifest)."""
    try:
        manifest = rundir.read_json(run_dir / "manifest.json")
    except (OSError, ValueError):
        return {}
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(stages, list):
        return {}
    return {e["name"]: e for e in stages if isinstance(e, dict) and isinstance(e.get("name"), str)}


def _output_doc(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """stages/<stage>/output.json of `run_dir`, read without following a link anywhere on
    the way (a task may have replaced its folder); None when missing or not an object."""
    try:
        fd = taskfiles.open_beneath(run_dir, ("stages", stage, "output.json"))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            doc = orjson.loads(f.read())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else None
