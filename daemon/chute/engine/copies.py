"""Copying a retry's kept stages from the old run's folder into the new run's.

Owns: stages/.copy-<name> (a stage folder being copied) and what a copy takes from a folder
its tasks could have shaped any way: regular files, folders, and links that stay inside the
run, each read without following a link (chute.store.taskfiles); a FIFO, socket, device or a
link out of the run is skipped. Also moving the copied outputs' paths to the new run. Not
here: which stages a retry keeps (chute.engine.retry).
Crash safety: each stage is copied to stages/.copy-<name>, its files and folders synced,
then renamed into place and stages/ synced: a stage folder is there whole or not at all. A
copy a crash cut short is a .copy- leftover, made again by the replay; a stage folder in
place is kept.
Diagnostics: what a copy skips is one WARNING line per stage, naming up to five entries.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path

import orjson

from chute.faults import crash_point
from chute.store import atomic, rundir, taskfiles
from chute.store.outputs import relocate

log = logging.getLogger(__name__)

COPY_PREFIX = ".copy-"


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
            src = taskfiles.open_beneath(old_dir, ("stages", name), taskfiles.DIR_FLAGS)
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
            doc = orjson.loads(rundir.read_bytes(mark))
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
            fd = os.open(e.name, taskfiles.DIR_FLAGS, dir_fd=src_fd)
            try:
                _copy_tree(fd, dest / e.name, where, skipped)
            finally:
                os.close(fd)
            atomic.fsync_dir(dest / e.name)
        elif e.is_file(follow_symlinks=False):
            if not _copy_file(src_fd, e.name, dest / e.name):
                skipped.append(f"{where} (changed to a special file)")
        else:
            skipped.append(f"{where} ({taskfiles.kind(e.stat(follow_symlinks=False).st_mode)})")


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
