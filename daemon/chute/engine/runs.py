"""Making runs: a new run folder and its graph, from a spec or from an earlier run.

Owns: the step from "a validated spec" to "an ActiveRun the engine can drive", and which
stages of an earlier run a retry keeps. Not here: the folder's files (chute.rundir), the
loop (chute.engine.loop).
Crash safety: the run folder with spec.yaml and run.json exists durably before the run is
handed to the engine (chute.rundir.create).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from chute import rundir
from chute.engine.dag import Reused, RunGraph
from chute.engine.loop import ActiveRun
from chute.spec.model import Pipeline
from chute.spool import Spool

REUSABLE = ("succeeded", "cached")


USER_TTL = 60.0  # seconds a uid's user name is reused (a lookup reads /etc/passwd)
_users: dict[int, tuple[str | None, float]] = {}


def submitter(uid: int | None = None) -> dict[str, Any]:
    uid = os.getuid() if uid is None else uid
    now = time.monotonic()
    user, at = _users.get(uid, (None, -USER_TTL))
    if now - at >= USER_TTL:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = None
        _users[uid] = (user, now)
    return {"uid": uid, "user": user}


def create_run(
    spool: Spool,
    pipeline: Pipeline,
    spec_bytes: bytes,
    *,
    trigger: dict[str, Any],
    now: datetime,
    submitted_by: dict[str, Any] | None = None,
    run_date: str | None = None,
    run_id: str | None = None,
    resumed_from: str | None = None,
    reused: Mapping[str, Reused] | None = None,
) -> ActiveRun:
    run_id = run_id or rundir.new_run_id(now)
    record = rundir.new_record(
        run_id=run_id,
        pipeline=pipeline.name,
        kind=pipeline.kind,
        trigger=trigger,
        submitted_by=submitted_by or submitter(),
        spec_sha256=hashlib.sha256(spec_bytes).hexdigest(),
        created_at=now,
        run_date=run_date or now.astimezone().date().isoformat(),
        resumed_from=resumed_from,
    )
    folder = rundir.create(spool, record, spec_bytes)
    return ActiveRun(
        run_id=run_id,
        pipeline=pipeline,
        graph=RunGraph(run_id, pipeline, reused),
        dir=folder,
        record=record,
        accepted=now.timestamp(),
    )


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
    stage that is run again."""
    manifest = rundir.read_json(old_dir / "manifest.json")
    entries = {e["name"]: e for e in manifest.get("stages", [])}
    rerun: set[str] = downstream(pipeline, rerun_from) if rerun_from else set()
    keep: dict[str, Reused] = {}
    for s in pipeline.stages:
        entry = entries.get(s.name)
        redo = s.name in rerun or any(d not in keep for d in s.depends_on)
        if redo or entry is None or entry.get("state") not in REUSABLE:
            rerun.add(s.name)
            continue
        try:
            doc = orjson.loads((old_dir / "stages" / s.name / "output.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            rerun.add(s.name)
            continue
        keep[s.name] = Reused(
            entry=entry, data=doc.get("data"), output_hash=doc["_meta"].get("output_hash")
        )
    return keep


def copy_reused(old_dir: Path, new_dir: Path, names: list[str]) -> None:
    """Copy the kept stages' folders (output, log, artifacts) into the new run."""
    for name in names:
        src = old_dir / "stages" / name
        if src.is_dir():
            shutil.copytree(src, new_dir / "stages" / name, symlinks=True, dirs_exist_ok=True)


def started_on_disk(run_dir: Path) -> bool:
    """Whether a run that run.json still calls `queued` had started: run.json turns `running`
    only with the run's first manifest (up to MANIFEST_INTERVAL after its first task), so a
    crash can come first. The mark is a stage folder without its output.json: made before
    its task started, and never by anything else (a retry's kept stages have theirs)."""
    try:
        with os.scandir(run_dir / "stages") as entries:
            return any(
                e.is_dir(follow_symlinks=False)
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


def resume_run(
    spool: Spool, run_id: str, *, node_cpus: int | None, node_memory: int | None
) -> ActiveRun:
    """The run `run_id` as it was left (queued, or running when a daemon stopped or died):
    same id and folder, its finished stages kept, the rest to run. Raises SpecError when its
    spec no longer validates here (a smaller node), OSError when its folder is unreadable."""
    from chute.spec import load_bytes

    folder = spool.runs / run_id
    record = rundir.read_json(folder / "run.json")
    raw = (folder / "spec.yaml").read_bytes()
    pipeline = load_bytes(
        raw, f"runs/{run_id}/spec.yaml", node_cpus=node_cpus, node_memory=node_memory
    )
    reused: dict[str, Reused] = {}
    try:
        entries = {e["name"]: e for e in rundir.read_json(folder / "manifest.json")["stages"]}
    except FileNotFoundError:
        entries = {}
    for s in pipeline.stages:
        out = folder / "stages" / s.name / "output.json"
        if not out.exists():
            entry = entries.get(s.name)
            if entry is not None and entry.get("state") in ("failed", "timed_out"):
                reused[s.name] = Reused(entry=entry, data=None, output_hash=None)
            continue  # else not finished (a sharded stage with some shards done runs whole)
        try:
            doc = orjson.loads(out.read_bytes())
        except orjson.JSONDecodeError:
            continue  # torn by a power loss before its fsync: the stage runs again
        entry = entries.get(s.name)
        if entry is None or entry.get("state") not in ("succeeded", "cached", "fallback"):
            # The done-mark landed after the last manifest: rebuild the entry from it.
            entry = {
                "name": s.name,
                "state": "succeeded",
                "dependsOn": list(s.depends_on),
                "cpus": s.cpus,
                "cores": [],
                "started_at": None,
                "finished_at": doc["_meta"].get("created_at"),
                "duration_seconds": doc["_meta"].get("duration_seconds"),
                "attempts": [],
                "attempts_total": 0,
                "attempts_omitted": 0,
                "cache": None,
                "output": f"stages/{s.name}/output.json",
                "log": f"stages/{s.name}/log",
                "shards": [],
            }
        reused[s.name] = Reused(
            entry=entry, data=doc.get("data"), output_hash=doc["_meta"].get("output_hash")
        )
    created = record.get("created_at")
    accepted = (
        datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() if created else 0.0
    )
    return ActiveRun(
        run_id=run_id,
        pipeline=pipeline,
        graph=RunGraph(run_id, pipeline, reused),
        dir=folder,
        record=record,
        accepted=accepted,
    )
