"""Making runs: a new run folder and its graph, from a spec or from an earlier run, and
what start-up does with a run it finds in queue/.

Owns: the step from "a validated spec" to "an ActiveRun the engine can drive", a retry
(which stages of an earlier run it keeps, copying them), a run's cancel mark, and the
recovery decision for one queued run. Not here: the folder's files (chute.store.rundir), the
loop (chute.engine.loop), control requests (chute.intake.control).
Crash safety: the run folder with spec.yaml and run.json exists durably before the run is
handed to the engine (chute.store.rundir.create). A retry's run records what it retries
(trigger {"type": "retry", "source": <old id>}); each kept stage is copied to
stages/.copy-<name>, the paths its output.json names in the old run moved to the new one
(chute.store.outputs.relocate: the new run never needs the old folder), synced, then renamed
into place, so a stage folder is there whole or not at all; then queue/<new id>.yaml is
written. A retry replayed after a crash (same new run id) finds that run, copies what is
missing and writes the queue file; once the queue file exists, recovery resumes the run and
a replay changes nothing. No error path removes
a run folder. A cancel is durable as runs/<id>/cancel.json before the daemon acts on it;
recovery ends such a run cancelled instead of resuming it. A run that ends outside the
engine (on_restart: fail, a failed recovery, a cancel without a daemon) gets its manifest
settled (settle_manifest: nothing left running, every attempt ended) before its final
run.json.
Diagnostics: RetryRefused and Unrecoverable carry one line that says what is wrong; what
a retry's copy skips (a FIFO, a link out of the run) is one WARNING line.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pwd
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from chute import names
from chute.clock import parse_rfc3339, rfc3339
from chute.engine.dag import STAGE_FINAL, UNIT_FINAL, Reused, RunGraph
from chute.engine.loop import ActiveRun
from chute.faults import crash_point
from chute.spec import SpecError, load_bytes
from chute.spec.model import Pipeline
from chute.store import atomic, rundir, taskfiles
from chute.store.outputs import relocate
from chute.store.spool import Spool

log = logging.getLogger(__name__)

REUSABLE = ("succeeded", "cached")
CANCEL_MARK = "cancel.json"
COPY_PREFIX = ".copy-"
UNRECOVERABLE_SUFFIX = ".unrecoverable"  # queue/<id>.yaml.unrecoverable: set aside by recovery


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
        keep[s.name] = Reused(entry=entry, data=doc.get("data"), output_hash=_output_hash(doc))
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
        fd = _open_inside(run_dir, ("stages", stage, "output.json"))
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


def _output_hash(doc: dict[str, Any]) -> str | None:
    meta = doc.get("_meta")
    value = meta.get("output_hash") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_inside(root: Path, parts: tuple[str, ...], flags: int = 0) -> int:
    """Open root/parts[0]/…/parts[-1] without following a symlink at any step (ELOOP or
    ENOTDIR when one is there); the last part with `flags` (default: a file to read)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        last_flags = flags or (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        return os.open(parts[-1], last_flags, dir_fd=fd)
    finally:
        os.close(fd)


def copy_reused(old_dir: Path, new_dir: Path, names: list[str], *, run_id: str = "") -> None:
    """Copy the kept stages' folders (output, log, artifacts) into the new run, each whole or
    not at all: into stages/.copy-<name>, synced, then renamed into place. A folder already
    in place was copied before a crash and is kept; a .copy- leftover is made again.

    Only regular files, folders and symbolic links that stay inside the run folder are
    copied, each read without following a link; anything else a task left there (a FIFO, a
    socket, a device, a link out of the run) is skipped with a WARNING line."""
    stages = new_dir / "stages"
    for name in names:
        dest = stages / name
        if os.path.lexists(dest):
            continue
        tmp = stages / f"{COPY_PREFIX}{name}"
        _remove(tmp)
        skipped: list[str] = []
        try:
            src = _open_inside(old_dir, ("stages", name), _DIR_FLAGS)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            os.mkdir(tmp)  # nothing to copy: an empty folder still says "kept"
        else:
            try:
                _copy_tree(src, tmp, f"stages/{name}", skipped)
            finally:
                os.close(src)
            _relocate_outputs(tmp, old_dir, new_dir)
        atomic.fsync_dir(tmp)
        # Handover: the stage folder appears whole, under its own name.
        os.rename(tmp, dest)
        atomic.fsync_dir(stages)
        if skipped:
            log.warning(
                "%s retry: kept stage %s without %d entr%s that %s not a regular file, folder "
                "or link inside the run: %s",
                run_id or new_dir.name,
                name,
                len(skipped),
                "y" if len(skipped) == 1 else "ies",
                "is" if len(skipped) == 1 else "are",
                ", ".join(skipped[:5]),
            )
        # Crash point: this stage is copied whole; the rest and the queue file are not.
        crash_point("retry.copied")


def origins(run_dir: Path) -> tuple[str, ...]:
    """The spellings of a run folder a task may have written into its output: as chute gave
    it (CHUTE_RUN_DIR, CHUTE_ARTIFACTS) and its real path."""
    return tuple(dict.fromkeys((str(run_dir), os.path.realpath(run_dir))))


def _relocate_outputs(folder: Path, old_dir: Path, new_dir: Path) -> None:
    """Rewrite the copied output.json of a kept stage (and of its shards) so that its data
    names files of the new run, not of the old one (outputs.relocate); `_meta`, and so the
    output_hash its dependents' cache keys use, stays as it was."""
    marks = [folder / "output.json"]
    with os.scandir(folder) as entries:
        marks += [
            Path(e.path) / "output.json"
            for e in entries
            if e.name.isdigit() and e.is_dir(follow_symlinks=False)
        ]
    for mark in marks:
        try:
            doc = orjson.loads(_read(mark))
        except (OSError, orjson.JSONDecodeError):
            continue  # none (a shard that did not succeed), or not one chute wrote
        if not isinstance(doc, dict) or "data" not in doc:
            continue
        data = relocate(doc["data"], origins(old_dir), str(new_dir))
        if data != doc["data"]:
            atomic.write_bytes(mark, atomic.dumps({**doc, "data": data}))


def _copy_tree(src_fd: int, dest: Path, rel: str, skipped: list[str]) -> None:
    """Copy the folder open as `src_fd` (at `rel` in the run folder) to `dest`, new."""
    os.mkdir(dest)
    with os.scandir(src_fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        where = f"{rel}/{e.name}"
        if e.is_symlink():
            target = os.readlink(e.name, dir_fd=src_fd)
            inside = os.path.normpath(os.path.join(os.path.dirname(where), target))
            if os.path.isabs(target) or inside == ".." or inside.startswith("../"):
                skipped.append(f"{where} (a link out of the run)")
            else:
                os.symlink(target, dest / e.name)
        elif e.is_dir(follow_symlinks=False):
            fd = os.open(e.name, _DIR_FLAGS, dir_fd=src_fd)
            try:
                _copy_tree(fd, dest / e.name, where, skipped)
            finally:
                os.close(fd)
            atomic.fsync_dir(dest / e.name)
        elif e.is_file(follow_symlinks=False):
            if not _copy_file(src_fd, e.name, dest / e.name):
                skipped.append(f"{where} (changed to a special file)")
        else:
            skipped.append(f"{where} ({_kind(e.stat(follow_symlinks=False).st_mode)})")


def _copy_file(dir_fd: int, name: str, dest: Path) -> bool:
    """Copy regular file `name` of `dir_fd` to `dest` (new), synced; False if it is not a
    regular file once open (a FIFO swapped in: never read, never blocked on)."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, st.st_mode & 0o777)
        try:
            offset = 0
            while True:
                sent = os.sendfile(out, fd, offset, 1 << 24)
                if sent == 0:
                    break
                offset += sent
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return True


def _remove(path: Path) -> None:
    """Remove a leftover of ours (a .copy- folder), whatever it is now."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


# -- retry -----------------------------------------------------------------------------------


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
    queue: bool = False,
    submitted_by: dict[str, Any] | None = None,
) -> ActiveRun | None:
    """The new run of `plan`: its folder (state queued, trigger retry of plan.old_id), the
    kept stages copied in, and with `queue` its queue/<id>.yaml (the daemon's runs);
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
        run = create_run(
            spool,
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
    else:
        if record.get("trigger") != trigger:
            raise RetryRefused(f"{new_id}: that run id is taken by another run")
        if record.get("state") != "queued" or (spool.queue / f"{new_id}.yaml").exists():
            return None
        log.info("%s finishing the retry of %s a crash interrupted", new_id, plan.old_id)
        run = ActiveRun(
            run_id=new_id,
            pipeline=plan.pipeline,
            graph=RunGraph(new_id, plan.pipeline, kept),
            dir=folder,
            record=record,
            accepted=_accepted(record),
        )
    copy_reused(plan.old_dir, folder, list(plan.reused), run_id=new_id)
    if queue:
        # Handover: the queue file makes the run known to recovery; until it exists, a
        # replayed request finishes the run instead.
        atomic.write_bytes(spool.queue / f"{new_id}.yaml", plan.raw)
    return run


def abandon_retry(spool: Spool, new_id: str, old_id: str, reason: str, now: float) -> bool:
    """A retry request that cannot be carried out any more (its old run is gone since): if
    a crash left its run half made (queued, no queue file), end that run failed with the
    reason, so the id the CLI printed does not stay queued for ever."""
    folder = spool.runs / names.run_id(new_id)
    record = _record_if_made(folder)
    if (
        record is None
        or record.get("trigger") != {"type": "retry", "source": old_id}
        or record.get("state") != "queued"
        or (spool.queue / f"{new_id}.yaml").exists()
    ):
        return False
    record.update(state="failed", error=f"retry not finished: {reason}", finished_at=rfc3339(now))
    atomic.write_json(folder / "run.json", record)
    return True


def _record_if_made(folder: Path) -> dict[str, Any] | None:
    """run.json of the run in `folder`, None when there is none (a folder without one is
    half made, and chute.store.rundir.create makes it again)."""
    try:
        record = rundir.read_json(folder / "run.json")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RetryRefused(f"{folder.name}: run id taken; its run.json: {_why(exc)}") from None
    if not isinstance(record, dict):
        raise RetryRefused(f"{folder.name}: run id taken; its run.json is not a JSON object")
    return record


def _accepted(record: dict[str, Any]) -> float:
    created = record.get("created_at")
    return parse_rfc3339(created).timestamp() if isinstance(created, str) else 0.0


def _why(exc: Exception) -> str:
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


# -- cancel ----------------------------------------------------------------------------------


def mark_cancelled(run_dir: Path, now: float) -> None:
    """Record durably that the run is to be cancelled (runs/<id>/cancel.json), before the
    cancel is acted on: a restart then ends the run cancelled instead of resuming it."""
    if not os.path.lexists(run_dir / CANCEL_MARK):
        atomic.write_json(run_dir / CANCEL_MARK, {"requested_at": rfc3339(now)})


def cancel_marked(run_dir: Path) -> bool:
    return os.path.lexists(run_dir / CANCEL_MARK)


def cancel_stopped(spool: Spool, run_id: str, now: float) -> dict[str, Any]:
    """Cancel a run no process drives (no daemon runs): run.json says cancelled (durable),
    then its queue file goes. Returns the run.json written."""
    folder = spool.runs / names.run_id(run_id)
    record = rundir.read_json(folder / "run.json")
    record.update(state="cancelled", error="cancelled", finished_at=rfc3339(now))
    settle_manifest(folder, "cancelled", now)  # a stopped run's, before run.json says over
    # Handover: run.json says the run is over; the queue file may go (recovery drops it).
    atomic.write_json(folder / "run.json", record)
    try:
        os.unlink(spool.queue / f"{run_id}.yaml")
    except FileNotFoundError:
        pass
    return dict(record)


def end_unqueued(spool: Spool, run_id: str, source: str, reason: str, now: float) -> bool:
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
        or (spool.queue / f"{run_id}.yaml").exists()
    ):
        return False
    record.update(state="cancelled", error=reason, finished_at=rfc3339(now))
    atomic.write_json(folder / "run.json", record)
    return True


# -- state on disk ---------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    """A file of a run folder, read as a task's file (a task may have replaced it by a FIFO
    or a folder: chute.store.taskfiles), within rundir.JSON_LIMIT."""
    return taskfiles.read_regular(str(path), rundir.JSON_LIMIT)


def started_on_disk(run_dir: Path) -> bool:
    """Whether a run that run.json still calls `queued` had started: run.json turns `running`
    only with the run's first manifest (up to MANIFEST_INTERVAL after its first task), so a
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


def settle_manifest(run_dir: Path, reason: str, now: float) -> bool:
    """Make the manifest of a run that ends outside the engine (recovery, a cancel without
    a daemon) agree with the final run.json that follows: every attempt left open ends at
    `now` with `reason`, and every stage and shard not final ends `cancelled` (a stage
    that had not ended did not end on its own). Durable before it returns; a missing
    manifest, or one not as chute writes it, is left alone. True when it was rewritten."""
    try:
        manifest = rundir.read_json(run_dir / "manifest.json")
    except (OSError, ValueError):  # none yet, or a task put something else in its place
        return False
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(stages, list):
        return False
    when = rfc3339(now)
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


# -- recovery --------------------------------------------------------------------------------


class Unrecoverable(Exception):
    """A run folder start-up cannot resume: str() says what is wrong with it."""


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
    now: float,
    node_cpus: int | None,
    node_memory: int | None,
) -> Recovery:
    """Decide and prepare what start-up does with queue/<run_id>.yaml (chute.daemon calls
    this for each). Raises Unrecoverable (or SpecError, OSError) when the run cannot be
    resumed: the caller ends it with recovery_failed()."""
    if not names.is_run_id(run_id):
        raise Unrecoverable(f"queue/{run_id}.yaml is not named by a run id")
    folder = spool.runs / run_id
    queued = spool.queue / f"{run_id}.yaml"
    rec = _run_record(folder)
    state = rec["state"]
    # An `interrupted` run with its queue file and no finished_at was stopped by a chute
    # before `stopped` existed: it resumes like one.
    if state in ("succeeded", "failed", "cancelled") or (
        state == "interrupted" and rec.get("finished_at")
    ):
        queued.unlink()  # finished before the crash; only the queue copy was left
        return Recovery(state)
    cancel = cancel_marked(folder)
    started = state != "queued" or started_on_disk(folder)
    if started and on_restart == "fail" and not cancel:
        reason = "the daemon stopped during the run (on_restart: fail)"
        settle_manifest(folder, reason, now)
        rec["state"] = "interrupted"
        rec["error"] = reason
        rec["finished_at"] = rfc3339(now)
        atomic.write_json(folder / "run.json", rec)
        queued.unlink()
        return Recovery("interrupted")
    run = resume_run(spool, run_id, node_cpus=node_cpus, node_memory=node_memory)
    if started and not cancel:
        run.record["recoveries"] = int(rec.get("recoveries") or 0) + 1
        run.record["state"] = "running"
        run.record["started_at"] = rec.get("started_at") or rfc3339(now)
        run.record["error"] = None
        run.record["finished_at"] = None
        atomic.write_json(run.dir / "run.json", run.record)
    return Recovery(str(run.record["state"]), run, started=started, cancel=cancel)


def recovery_failed(spool: Spool, run_id: str, reason: str, now: float) -> bool:
    """End a run recovery could not resume: run.json says failed with `error: "recovery
    failed: <reason>"` (cancelled, when a cancel was recorded), then its queue file goes.
    False when run.json cannot be written (missing, not an object, not writable): then the
    queue file is set aside as queue/<id>.yaml.unrecoverable, so no restart loops on it."""
    queued = spool.queue / f"{run_id}.yaml"
    try:
        if not names.is_run_id(run_id):
            raise Unrecoverable("not a run id")
        folder = spool.runs / run_id
        rec = _run_record(folder)
        if cancel_marked(folder):
            rec.update(state="cancelled", error="cancelled")
        else:
            rec.update(state="failed", error=f"recovery failed: {reason}")
        rec["finished_at"] = rfc3339(now)
        try:
            settle_manifest(folder, str(rec["error"]), now)
        except OSError as exc:  # the manifest may be what recovery could not use
            log.warning("%s: manifest not settled: %s", run_id, _why(exc))
        atomic.write_json(folder / "run.json", rec)
    except (Unrecoverable, OSError):
        os.rename(queued, queued.with_name(queued.name + UNRECOVERABLE_SUFFIX))
        return False
    try:
        queued.unlink()
    except FileNotFoundError:
        pass
    return True


def queue_made(
    spool: Spool, run_id: str, spec_bytes: bytes, *, node_cpus: int | None, node_memory: int | None
) -> ActiveRun | None:
    """A run made before a crash and never queued (run.json queued, no queue file): write
    its queue file and return it to drive; None when it is queued already or went on."""
    folder = spool.runs / names.run_id(run_id)
    queued = spool.queue / f"{run_id}.yaml"
    if _run_record(folder)["state"] != "queued" or queued.exists():
        return None
    run = resume_run(spool, run_id, node_cpus=node_cpus, node_memory=node_memory)
    # Handover: the queue file makes the run known to recovery.
    atomic.write_bytes(queued, spec_bytes)
    return run


def _run_record(folder: Path) -> dict[str, Any]:
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
    record = _run_record(folder)
    raw = _read(folder / "spec.yaml")
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
            doc = orjson.loads(_read(out))
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
        reused[s.name] = Reused(entry=entry, data=doc.get("data"), output_hash=_output_hash(doc))
    return ActiveRun(
        run_id=run_id,
        pipeline=pipeline,
        graph=RunGraph(run_id, pipeline, reused),
        dir=folder,
        record=record,
        accepted=_accepted(record),
    )


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
