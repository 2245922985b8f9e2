"""A group commit: many files made durable together, with one sync per folder or two per
filesystem instead of one per file and folder.

Owns: the steps of one batch (`commit`: write every temp, sync them, rename them in order,
sync the names), what it could not write (Unwritten) and why (an error about one path drops
that path and the later files of its scope; an error about the filesystem is raised), the
choice of syncfs(2) for filesystems chute has to itself (own_filesystems), and `write_many`,
a batch on the caller's thread. Not here: one file (chute.store.atomic, whose temps and
fsyncs a batch uses), batches committed in order by a thread of their own
(chute.store.writer).
Crash safety: each file is atomic on its own, the batch is not: a crash may leave some of
it renamed, so callers list the file that acknowledges the others last, and a scope's
files after one that failed are not put in place. A temp a crash leaves starts with
`.tmp-` and is ignored by every reader.
Diagnostics: none of its own: the caller gets the Unwritten paths, or the OSError about
the filesystem.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from chute.store import atomic


def write_many(
    files: Iterable[tuple[Path, bytes]],
    mode: int = 0o644,
    folders: Iterable[Path] = (),
    synced: Iterable[Path] = (),
) -> None:
    """Group commit: write every temp, fsync them all (with `synced`: files already in place
    by write_volatile; one that is gone since is skipped), rename them in order, then fsync
    each folder once (those of the files, and `folders`: ones that gained a new subfolder).

    Each file is atomic on its own; the batch is not (a crash may leave some renamed), so
    callers list the file that acknowledges the others last. The first error is raised,
    after the files it does not concern have landed (see `commit`).
    """
    unwritten = commit(list(files), folders=folders, synced=synced, mode=mode)
    if unwritten:
        raise unwritten[0].error


@dataclass(frozen=True, slots=True)
class Unwritten:
    """A path a group commit could not make durable (a file: not put in place), the error
    about it, and `cause`: the path the error is about (itself, or an earlier file of its
    scope, which this one would have acknowledged)."""

    path: Path
    error: OSError
    cause: Path


def commit(
    files: list[tuple[Path, bytes]],
    *,
    folders: Iterable[Path] = (),
    synced: Iterable[Path] = (),
    filesystems: Sequence[int] = (),
    scope: Callable[[Path], Hashable | None] | None = None,
    mode: int = 0o644,
) -> list[Unwritten]:
    """One group commit, path by path; returns what could not be written.

    By fsyncs: every temp is written, the temps and `synced` (files already in place by
    write_volatile; one gone since is skipped) are fsynced, the temps are renamed in order,
    then each folder is fsynced once (those of the files, and `folders`: ones that gained
    a new subfolder). With `filesystems` (a descriptor of each; chute has them to itself):
    the temps are written, one syncfs(2) per filesystem makes them (and whatever else waits
    to be synced there) durable, they are renamed, and a second syncfs makes the names
    durable: two syncs per batch instead of one per file and folder; the cost is that
    syncfs also writes back other processes' dirty data there, so it is for a spool on a
    filesystem of its own.

    An error about one path (not environment_wide: its folder gone, a folder or a FIFO in
    its place) drops that path and every later file of its scope (`scope(path)`, e.g. the
    files of one run, so that a run.json is not put in place without the manifest before
    it; None: no scope) and is returned; the rest of the batch lands. An error about the
    filesystem is raised: the caller retries the whole batch (a temp it leaves is removed
    by the next write of its file).
    """
    unwritten: list[Unwritten] = []
    failed: set[int] = set()  # indexes into `files`
    doomed: dict[Hashable, tuple[int, Unwritten]] = {}  # scope -> the first failure in it

    def fail(index: int, path: Path, exc: OSError) -> None:
        if atomic.environment_wide(exc):
            raise exc
        lost = Unwritten(path, exc, path)
        unwritten.append(lost)
        failed.add(index)
        key = None if scope is None else scope(path)
        if key is not None and key not in doomed:
            doomed[key] = (index, lost)

    def dropped(index: int, path: Path) -> bool:
        """Whether the file at `index` is not to be put in place (noted if newly so)."""
        if index in failed:
            return True
        if not doomed:  # the usual case: nothing failed
            return False
        key = None if scope is None else scope(path)
        first = None if key is None else doomed.get(key)
        if first is None or first[0] > index:
            return False
        unwritten.append(Unwritten(path, first[1].error, first[1].cause))
        failed.add(index)
        return True

    staged: dict[int, Path] = {}  # index -> its temp, until renamed or dropped
    try:
        marks = list(synced)
        mark_errors = {} if filesystems else atomic.fsync_all(marks)
        for path, error in mark_errors.items():
            # In place already, so first in the order: one that fails dooms its scope.
            if not isinstance(error, FileNotFoundError):  # gone since: nothing to sync
                fail(-1, path, error)
        for i, (path, data) in enumerate(files):
            if dropped(i, path):
                continue
            try:
                staged[i] = atomic.write_temp(path, data, mode)
            except OSError as exc:
                fail(i, path, exc)
        to_sync = set(folders)
        if filesystems:
            for fd in filesystems:
                syncfs(fd)
        else:
            to_sync.update(p.parent for p in marks if p not in mark_errors)
            errors = atomic.fsync_all(list(staged.values()))
            for i, tmp in list(staged.items()):
                if tmp in errors:
                    fail(i, files[i][0], errors[tmp])
        for i, tmp in list(staged.items()):
            path = files[i][0]
            if not dropped(i, path):
                try:
                    os.rename(tmp, path)
                    del staged[i]
                    to_sync.add(path.parent)
                    continue
                except OSError as exc:
                    fail(i, path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            del staged[i]
        if filesystems:
            if files:
                for fd in filesystems:
                    syncfs(fd)
        else:
            for folder, error in atomic.sync_folders(to_sync).items():
                if not isinstance(error, FileNotFoundError):  # gone: no names left to sync
                    fail(-1, folder, error)
    finally:
        for tmp in staged.values():  # an error about the filesystem: the retry writes anew
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return unwritten


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """syncfs(2) on the filesystem of `fd`: write back and flush all of it. It reports
    write-back errors since Linux 5.8 (earlier ones pass silently)."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def own_filesystems(mode: str, roots: Iterable[Path]) -> list[Path]:
    """The roots to sync whole with syncfs(2) under config `sync: mode`, one per filesystem;
    [] means fsync per file. `auto`: syncfs only when every root's filesystem is the
    root's own (a mount point), so no other program's dirty data is flushed with it."""
    if mode == "fsync":
        return []
    mine: dict[int, Path] = {}
    for root in roots:
        dev = os.stat(root).st_dev
        if dev in mine:
            continue  # runs/ under the spool, on the same filesystem
        if mode == "auto" and not os.path.ismount(root):
            return []
        mine[dev] = root
    return list(mine.values())
