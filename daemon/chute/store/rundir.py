"""A run's folder: run.json, manifest.json, spec.yaml, stages/, and the `latest` links.

Owns: runs/<run_id>/ and its files' formats (stages/<stage>[/<shard>]/ included), making
run folders, runs/latest, pipelines/<name>/latest, finding a run by name. Its tasks may have
changed anything in a run folder: its files are read as a task's files
(chute.store.taskfiles), and a folder is removed however deep a task nested it (remove_tree).
Not here: deciding states and which runs to make (chute.engine), a run's queue file
(chute.store.queue), durable writes (chute.store.atomic), which runs retention removes and
when (chute.store.retention).
Crash safety: the folder is created with spec.yaml and run.json (state queued) in one group
commit before the run is acknowledged; every later file is replaced atomically, so a reader
sees a whole run.json or the previous one. `latest` links are replaced by rename.
Diagnostics: an unknown run name raises UnknownRun with the closest known names; a name not
of a run's form (chute.names) raises it before any file is looked at.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import os
import secrets
import shutil
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from chute import __version__, names
from chute.clock import rfc3339
from chute.store import atomic, groupcommit, taskfiles
from chute.store.spool import Spool

RUN_STATES = ("queued", "running", "stopped", "succeeded", "failed", "cancelled", "interrupted")
FINAL_RUN_STATES = ("succeeded", "failed", "cancelled", "interrupted")
"""`stopped` is not final: the daemon stopped under the run, which resumes at its next start
(or ends `interrupted` then, under `on_restart: fail`). `interrupted` is final: never resumed."""


class UnknownRun(LookupError):
    pass


_last_id = ""
_id_lock = threading.Lock()


def new_run_id(now: datetime) -> str:
    """`20261122_101500_a1b2c3` (UTC): the suffix is the time within the second in 64 µs
    ticks (4 hex digits) and 2 random ones, so ids sort by creation (latest, retention) and
    two processes rarely meet; within one process ids strictly increase, so never meet."""
    global _last_id
    now = now.astimezone(UTC)
    base = now.strftime("%Y%m%d_%H%M%S_")
    suffix = ((now.microsecond >> 6) << 8) | secrets.randbelow(256)
    with _id_lock:
        if _last_id[:16] == base and int(_last_id[16:], 16) >= suffix:
            suffix = int(_last_id[16:], 16) + 1
        run_id = f"{base}{suffix:06x}"
        _last_id = run_id
    return run_id


def stage_dir(run_dir: Path, stage: str, shard: int | None = None) -> Path:
    """A unit's folder: stages/<stage>, or stages/<stage>/<shard> for a shard."""
    base = run_dir / "stages" / stage
    return base if shard is None else base / str(shard)


def stage_dirs(run_dir: Path, stage: str, shard: int | None = None) -> tuple[Path, ...]:
    """The folders a unit's task needs, parents first: its stage's, its own, its artifacts/."""
    folder = stage_dir(run_dir, stage, shard)
    return tuple(dict.fromkeys((run_dir / "stages" / stage, folder, folder / "artifacts")))


def new_record(
    *,
    run_id: str,
    pipeline: str,
    kind: str,
    trigger: dict[str, Any],
    submitted_by: dict[str, Any],
    spec_sha256: str,
    created_at: datetime,
    run_date: str,
    resumed_from: str | None = None,
) -> dict[str, Any]:
    """run.json of a run just accepted (state queued)."""
    return {
        "run_id": run_id,
        "pipeline": pipeline,
        "kind": kind,
        "state": "queued",
        "trigger": trigger,
        "submitted_by": submitted_by,
        "spec_sha256": spec_sha256,
        "created_at": rfc3339(created_at),
        "started_at": None,
        "finished_at": None,
        "duration_seconds": None,
        "resumed_from": resumed_from,
        "recoveries": 0,
        "run_date": run_date,
        "host": socket.gethostname(),
        "chute_version": __version__,
        "error": None,
    }


def make_folders(
    spool: Spool, items: list[tuple[dict[str, Any], bytes]], *, durable: bool = True
) -> atomic.Unsynced:
    """Make the run folders of `items` ((run.json record, spec bytes) each) in one group
    commit: runs/<id>/ with stages/, spec.yaml and run.json. FileExistsError: a run id is
    taken (a folder with its run.json); a folder without one is half made and made again.

    Not `durable`: the files are only put in place (write_volatile), and what must be synced
    is returned for the caller's writer thread; until it is, a power loss may leave a folder
    with an empty or missing run.json (the daemon's intake keeps its claim until then)."""
    pending = atomic.Unsynced(folders={spool.runs})
    if not items:
        return pending
    spool.runs.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, bytes]] = []
    for record, spec_bytes in items:
        run_dir = spool.runs / str(record["run_id"])
        try:
            os.mkdir(run_dir)
        except FileExistsError:
            if (run_dir / "run.json").exists():
                raise  # that id is taken; a run is never made twice
            shutil.rmtree(run_dir)  # half made before a crash: make it again
            os.mkdir(run_dir)
        os.mkdir(run_dir / "stages")
        files.append((run_dir / "spec.yaml", spec_bytes))
        files.append((run_dir / "run.json", atomic.dumps(record)))
    if durable:
        # Handover: once run.json (queued) is durable the run exists.
        groupcommit.write_many(files, folders=pending.folders)
        pending.folders.clear()
    else:
        for path, data in files:
            atomic.write_volatile(path, data)
            pending.files.append(path)
    return pending


def point_latest(spool: Spool, records: list[dict[str, Any]]) -> None:
    """Point runs/latest at the last of `records`, and each pipeline's latest at its last."""
    if not records:
        return
    newest: dict[str, str] = {}
    for record in records:
        newest[str(record["pipeline"])] = str(record["run_id"])
    for pipeline, run_id in newest.items():
        _point_pipeline_latest(spool, run_id, pipeline)
    atomic.replace_symlink(spool.runs / "latest", str(records[-1]["run_id"]))


def _point_pipeline_latest(spool: Spool, run_id: str, pipeline: str) -> None:
    """pipelines/<name>/latest → `run_id` (atomic.replace_symlink)."""
    folder = spool.pipelines / pipeline
    target = os.path.relpath(spool.runs / run_id, folder)
    for _ in range(3):
        try:
            atomic.replace_symlink(folder / "latest", target)
            return
        except FileNotFoundError:  # the pipeline's first run (or retention just emptied it)
            folder.mkdir(parents=True, exist_ok=True)
    atomic.replace_symlink(folder / "latest", target)


JSON_LIMIT = 256 << 20
"""Bytes a run's JSON file may have when read back (a manifest of 10,000 shards: ~30 MB)."""


def read_bytes(path: Path) -> bytes:
    """A file of a run folder, read as a task's file (chute.store.taskfiles: a task may have
    put a FIFO or a folder in its place): OSError when it is not a regular file within
    JSON_LIMIT."""
    return taskfiles.read_regular(str(path), JSON_LIMIT)


def read_json(path: Path) -> Any:
    """A run's JSON file, read as read_bytes reads it."""
    return orjson.loads(read_bytes(path))


def run_ids(spool: Spool) -> list[str]:
    """Every run folder's name, oldest first (run ids sort by time)."""
    try:
        names = [e.name for e in os.scandir(spool.runs) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith("."))


def find_run(spool: Spool, ref: str) -> Path:
    """The folder of run `ref`: an id, a unique id prefix, `latest`, or `<pipeline>/latest`
    (chute.names checks the form first: a ref never leads out of runs/)."""
    try:
        names.run_ref(ref)
    except names.BadName as exc:
        raise UnknownRun(str(exc)) from None
    if ref == "latest" or ref.endswith("/latest"):
        link = spool.runs / "latest" if ref == "latest" else spool.pipelines / ref
        try:
            target = os.readlink(link)
        except OSError:
            target = ""
        folder = link.parent / target
        if (
            names.is_run_id(folder.name)
            and os.path.realpath(folder.parent) == os.path.realpath(spool.runs)
            and (folder / "run.json").exists()
        ):
            return spool.runs / folder.name
        raise UnknownRun(f"{ref}: no run yet" + ("" if ref == "latest" else " for that pipeline"))
    candidate = spool.runs / ref
    if names.is_run_id(ref) and (candidate / "run.json").exists():
        return candidate
    ids = run_ids(spool)
    matches = [i for i in ids if ref and i.startswith(ref)]
    if len(matches) == 1:
        return spool.runs / matches[0]
    if len(matches) > 1:
        raise UnknownRun(f"{ref}: ambiguous, matches {', '.join(matches[-5:])}")
    close = difflib.get_close_matches(ref, ids, n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    known = f" ({len(ids)} runs in {spool.runs})" if ids else f" (no runs in {spool.runs})"
    raise UnknownRun(f"{ref}: no such run{known}{hint}")


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def remove_tree(top: Path) -> None:
    """`rm -rf top`, best effort (what cannot be removed stays), however its tasks shaped
    it: shutil.rmtree recurses once per level, and a task can nest folders thousands deep
    (RecursionError), past PATH_MAX. Here the tree is flattened instead: a folder's
    subfolders are moved up into `top` until each folder is empty, with two descriptors
    open at a time and no path longer than two names."""
    try:
        top_fd = os.open(top, _DIR)
    except OSError:
        return
    moved = itertools.count()
    try:
        while entries := os.listdir(top_fd):
            changed = False  # a pass that removes or moves nothing ends it: the rest stays
            for name in entries:
                try:
                    os.unlink(name, dir_fd=top_fd)
                    changed = True
                    continue
                except IsADirectoryError:
                    pass
                except OSError:
                    continue
                try:
                    sub_fd = os.open(name, _DIR, dir_fd=top_fd)
                except OSError:
                    continue
                try:
                    for child in os.listdir(sub_fd):
                        try:
                            os.unlink(child, dir_fd=sub_fd)
                        except IsADirectoryError:
                            up = f".rm-{next(moved)}"
                            os.rename(child, up, src_dir_fd=sub_fd, dst_dir_fd=top_fd)
                        changed = True
                except OSError:
                    pass
                finally:
                    os.close(sub_fd)
                try:
                    os.rmdir(name, dir_fd=top_fd)
                    changed = True
                except OSError:
                    pass
            if not changed:
                return
    except OSError:
        return
    finally:
        os.close(top_fd)
    with contextlib.suppress(OSError):
        os.rmdir(top)
