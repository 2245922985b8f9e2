"""Making runs: one way to make a run's folder and the ActiveRun the engine drives, for a
new, fired, retried or resumed run, in the daemon and in `chute run`.

Owns: ActiveRun (a run the engine drives, and its per-run loop state); a new run's run.json
(NewRun: trigger, submitter, spec digest, run date); making new runs' folders, with their
queue files when a daemon drives them (make_runs, make_run); the ActiveRun of a run whose
folder exists (active_run): just made, accepted by intake, a retry replayed, or resumed as
a stop or crash left it (resume_run, from its done-marks). Not here: a run folder's files
and formats (chute.store.rundir), queue/ (chute.store.queue), what a retry keeps
(chute.engine.retry), what start-up does with a run (chute.engine.recovery), driving a run
(chute.engine.loop).
Crash safety: make_runs puts each run folder, with spec.yaml and run.json (state queued), in
one group commit, then the queue files (durable before the run is handed to the engine),
then the latest links. A folder without run.json is half made, and is made again under the
same id; one with run.json is never made twice (FileExistsError). resume_run keeps only
what a done-mark (stages/<name>/output.json) says is done: any other stage runs again.
Diagnostics: Unrecoverable says in one line what in a run folder is not as chute writes it.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from chute import names
from chute.clock import parse_rfc3339
from chute.engine.dag import RunGraph
from chute.engine.stage import Reused
from chute.spec import load_bytes
from chute.spec.model import Pipeline
from chute.store import atomic, queue, rundir
from chute.store.outputs import stored_hash
from chute.store.spool import Spool


@dataclass(slots=True, eq=False)
class ActiveRun:
    """A run the engine is driving."""

    run_id: str
    pipeline: Pipeline
    graph: RunGraph
    dir: Path
    record: dict[str, Any]  # its run.json, as the engine last changed it
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


USER_TTL = 60.0  # seconds a uid's user name is reused (a lookup reads /etc/passwd)
_users: dict[int, tuple[str | None, float]] = {}


def submitter(uid: int | None = None) -> dict[str, Any]:
    """run.json's `submitted_by` for `uid` (default: this process's user)."""
    uid = os.getuid() if uid is None else uid
    mono = time.monotonic()
    user, at = _users.get(uid, (None, -USER_TTL))
    if mono - at >= USER_TTL:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = None
        _users[uid] = (user, mono)
    return {"uid": uid, "user": user}


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to make: its run.json (state queued), its spec, and the stages it keeps."""

    record: dict[str, Any]
    pipeline: Pipeline
    spec_bytes: bytes
    accepted: float  # epoch seconds, exact (run.json's created_at is in milliseconds)
    reused: Mapping[str, Reused] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return str(self.record["run_id"])


def new_run(
    pipeline: Pipeline,
    spec_bytes: bytes,
    *,
    trigger: dict[str, Any],
    now: datetime,
    run_id: str | None = None,
    submitted_by: dict[str, Any] | None = None,
    run_date: str | None = None,
    resumed_from: str | None = None,
    reused: Mapping[str, Reused] | None = None,
) -> NewRun:
    """The run to make of `pipeline` at `now`, nothing written yet: a new id unless given,
    this process's user unless `submitted_by`, and `now`'s date in the host's zone unless
    `run_date` (a fire's date in its schedule's zone)."""
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
    return NewRun(record, pipeline, spec_bytes, now.timestamp(), reused or {})


def make_runs(
    spool: Spool, news: Sequence[NewRun], *, queue_files: bool, durable: bool = True
) -> atomic.Unsynced:
    """Make the folders of `news` in one group commit, with their queue files when
    `queue_files` (a daemon's runs), then point the latest links at the newest.
    FileExistsError: a run id is taken.

    Not `durable`: the files are only put in place, and what must be synced before the runs
    may start is returned for the caller's writer thread (chute.daemon.admission)."""
    pending = rundir.make_folders(spool, [(n.record, n.spec_bytes) for n in news], durable=durable)
    if queue_files and news:
        queue.link_many(spool, [(n.run_id, n.spec_bytes) for n in news])
        # Handover: the queue file tells the daemon (now or after a restart) the run waits.
        pending.folders.add(spool.queue)
        if durable:
            pending.sync()
            pending.folders.clear()
    rundir.point_latest(spool, [n.record for n in news])
    return pending


def make_run(spool: Spool, new: NewRun) -> ActiveRun:
    """Make the folder of `new`, durably, and the ActiveRun that drives it. Its queue file,
    if a daemon drives it, is the caller's to write once the run is whole (a retry copies
    its kept stages first)."""
    make_runs(spool, [new], queue_files=False)
    return active_run(spool, new.record, new.pipeline, new.reused, accepted=new.accepted)


def active_run(
    spool: Spool,
    record: dict[str, Any],
    pipeline: Pipeline,
    reused: Mapping[str, Reused] | None = None,
    *,
    accepted: float | None = None,
) -> ActiveRun:
    """The ActiveRun of the run whose run.json is `record` (its folder exists), keeping the
    stages in `reused`. `accepted` orders it in the queue (default: its created_at)."""
    run_id = str(record["run_id"])
    if accepted is None:
        created = record.get("created_at")
        accepted = parse_rfc3339(created).timestamp() if isinstance(created, str) else 0.0
    return ActiveRun(
        run_id=run_id,
        pipeline=pipeline,
        graph=RunGraph(run_id, pipeline, reused),
        dir=spool.runs / run_id,
        record=record,
        accepted=accepted,
    )


# -- a run as a stop or a crash left it ------------------------------------------------------


class Unrecoverable(Exception):
    """A run folder start-up cannot resume: str() says what is wrong with it."""


def run_record(folder: Path) -> dict[str, Any]:
    """run.json of `folder`, which must be an object with a state; else Unrecoverable."""
    try:
        rec = rundir.read_json(folder / "run.json")
    except FileNotFoundError:
        raise Unrecoverable(f"runs/{folder.name}/run.json is missing") from None
    except ValueError as exc:
        raise Unrecoverable(f"runs/{folder.name}/run.json is not JSON ({exc})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("state"), str):
        raise Unrecoverable(
            f"runs/{folder.name}/run.json is not a run record (a JSON object with a state)"
        )
    return rec


def resume_run(
    spool: Spool, run_id: str, *, node_cpus: int | None, node_memory: int | None
) -> ActiveRun:
    """The run `run_id` as it was left (queued, or running when a daemon stopped or died):
    same id and folder, its finished stages kept, the rest to run. Raises SpecError when its
    spec no longer validates here (a smaller node), OSError when its folder is unreadable,
    Unrecoverable when a file in it is not as chute writes it."""
    folder = spool.runs / run_id
    record = run_record(folder)
    raw = rundir.read_bytes(folder / "spec.yaml")
    pipeline = load_bytes(
        raw, f"runs/{run_id}/spec.yaml", node_cpus=node_cpus, node_memory=node_memory
    )
    reused: dict[str, Reused] = {}
    entries = _resume_entries(folder)
    for s in pipeline.stages:
        stage_dir = folder / "stages" / s.name
        if os.path.lexists(stage_dir) and not stat.S_ISDIR(os.lstat(stage_dir).st_mode):
            raise Unrecoverable(f"runs/{run_id}/stages/{s.name} is not a folder")
        out = stage_dir / "output.json"
        if not os.path.lexists(out):
            entry = entries.get(s.name)
            if entry is not None and entry.get("state") in ("failed", "timed_out"):
                reused[s.name] = Reused(entry=entry, data=None, output_hash=None)
            continue  # else not finished (a sharded stage with some shards done runs whole)
        try:
            doc = orjson.loads(rundir.read_bytes(out))
        except (OSError, orjson.JSONDecodeError):
            # Torn by a power loss before its fsync, or a task put something else there
            # (a FIFO, a folder): not a done-mark, so the stage runs again.
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("_meta", {}), dict):
            raise Unrecoverable(f"runs/{run_id}/stages/{s.name}/output.json is not an output")
        meta = doc.get("_meta", {})
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
                "finished_at": meta.get("created_at"),
                "duration_seconds": meta.get("duration_seconds"),
                "attempts": [],
                "attempts_total": 0,
                "attempts_omitted": 0,
                "cache": None,
                "output": f"stages/{s.name}/output.json",
                "log": f"stages/{s.name}/log",
                "shards": [],
            }
        reused[s.name] = Reused(entry=entry, data=doc.get("data"), output_hash=stored_hash(doc))
    return active_run(spool, record, pipeline, reused)


def _resume_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's entries by name for a resume: none yet is fine, one that is not as
    chute writes it is Unrecoverable (a resume must not guess which stages ended)."""
    path = folder / "manifest.json"
    try:
        manifest = rundir.read_json(path)
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise Unrecoverable(f"runs/{folder.name}/manifest.json is not JSON ({exc})") from None
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(stages, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in stages
    ):
        raise Unrecoverable(f"runs/{folder.name}/manifest.json is not a manifest")
    return {e["name"]: e for e in stages}


def queue_made(
    spool: Spool, run_id: str, spec_bytes: bytes, *, node_cpus: int | None, node_memory: int | None
) -> ActiveRun | None:
    """A run made before a crash and never queued (run.json queued, no queue file): write
    its queue file and return it to drive; None when it is queued already or went on."""
    if run_record(spool.runs / names.run_id(run_id))["state"] != "queued" or queue.exists(
        spool, run_id
    ):
        return None
    run = resume_run(spool, run_id, node_cpus=node_cpus, node_memory=node_memory)
    # Handover: the queue file makes the run known to recovery.
    queue.make(spool, run_id, spec_bytes)
    return run
