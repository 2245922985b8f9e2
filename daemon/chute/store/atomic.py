"""Durable writes of one file: the only code that opens state files for writing.

Owns: write-to-temp, fsync, rename, fsync-the-folder (write_bytes) and its variants for a
drop box (drop), a lock file (create_locked), a name chosen by the writer (write_unplaced,
place) and a file rebuilt often (write_volatile); atomic symlink replacement; fsyncs of
many paths at once (fsync_each, Unsynced); the temp names and their leftovers. Not here:
a batch of files made durable together (chute.store.groupcommit), and the writer thread
that commits batches for the daemon's loop (chute.store.writer).
Crash safety: a reader sees the old file or the new one, never a mix; after `write_*`
returns, the new name survives power loss (its folder was fsynced). A temp leftover
from a crash starts with `.tmp-` and is ignored by every reader; it ends with its writer's
pid, so a cleanup leaves a live writer's temp alone (remove_temp_leftovers).
Temp files are created with O_EXCL|O_NOFOLLOW: a run folder is a task's to scribble in,
and a FIFO or a link a task put at a temp name must neither block a write nor redirect it.
Diagnostics: OSError propagates to the caller, which knows the handover that failed;
`environment_wide` tells an error about the filesystem from one about the path.
Limits: a failed fsync is not retried on the same file (fsyncgate): the caller redoes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson

TMP_PREFIX = ".tmp-"
PARALLEL_FROM = 16  # paths in one batch from which their fsyncs overlap (fsync_each)
SYNC_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()

ENVIRONMENT_WIDE = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM}
)
"""Errnos about the filesystem or the process (no room, read-only, I/O error, out of
descriptors or memory): they say nothing about the path at hand, so all writes wait."""


def environment_wide(exc: OSError) -> bool:
    """Whether `exc` is about the filesystem or the process rather than about one path.

    Any other errno (ENOENT, EISDIR, ENOTDIR, ELOOP, EACCES, ...) is about the path: in a
    run folder, that run's problem (a task may have removed or replaced anything there)."""
    return exc.errno in ENVIRONMENT_WIDE


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make the names in `folder` durable (a new or renamed entry needs this)."""
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by name (a FIFO a task put there fails, EINVAL, at once)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a temp name beside `path` (not synced: the caller syncs it).

    Created, never opened: whatever is at the temp name (a leftover of this pid's earlier
    life or of a failed write, or a FIFO or link a task put there) is removed first."""
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, _CREATE, mode)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, _CREATE, mode)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    return tmp


def _put(path: Path, data: bytes, mode: int) -> None:
    """`data` at `path`: temp, fsync, rename (the temp removed when a step fails)."""
    tmp = write_temp(path, data, mode)
    try:
        fsync_path(tmp)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically and durably replace `path` with `data`."""
    _put(path, data, mode)
    with contextlib.suppress(FileNotFoundError):  # the folder went since: no name to sync
        fsync_dir(path.parent)


def write_json(path: Path, obj: object) -> None:
    write_bytes(path, dumps(obj))


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


def drop(path: Path, data: bytes) -> None:
    """write_bytes into a drop box (incoming/, control/): under systemd a member of the submit
    group may create and rename there but not read the folder, so cannot fsync it. The file
    is still written to a temp name, synced and renamed; the folder's name is then synced by
    the daemon when it takes the file (intake fsyncs incoming/ with every claim)."""
    _put(path, data, 0o644)
    with contextlib.suppress(PermissionError):
        fsync_dir(path.parent)


def create_locked(path: Path, data: bytes) -> int:
    """Create `path` with `data`, durably, holding an exclusive flock on it before its name
    appears: returns the descriptor (append-only), which keeps the lock until it is closed.
    So a reader that finds the name and can take the lock knows its holder is gone.
    FileExistsError when `path` exists."""
    if path.exists():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_all(fd, data)
        os.fsync(fd)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return fd


def write_unplaced(path: Path, data: bytes) -> tuple[Path, int]:
    """The first half of a drop whose writer must know the file before anyone sees it: write
    and fsync `data` under a temp name beside `path` (ignored by every reader), and return
    that name with a read-only descriptor of the file (its identity, for as long as it is
    held). No descriptor for writing is left open: the daemon takes a file only once nobody
    writes to it (its read lease)."""
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        reader = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(reader)
            raise
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp, reader


def place(tmp: Path, path: Path) -> None:
    """The second half: rename `tmp` to `path`, never over a file already there
    (FileExistsError: pick another name), then sync the folder where we may read it (in a
    drop box the daemon syncs it when it takes the file, as with drop())."""
    rename_noreplace(tmp, path)
    try:
        fsync_dir(path.parent)
    except PermissionError:
        pass


_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError when `dst` exists (renameat2 with
    RENAME_NOREPLACE), so two writers choosing the same free name cannot replace each other's
    file. Where the filesystem or libc lacks it (NFS: EINVAL), it checks, then renames: two
    writers may still meet there in the instant between."""
    func = getattr(_libc, "renameat2", None)
    if func is not None:
        if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def write_volatile(path: Path, data: bytes) -> None:
    """Atomic but not durable (no fsync): the new content is in place at once and survives
    the death of this process, not a power loss. Alone, for files rebuilt often (the
    daemon's status.json); followed by Committer.submit(synced=[path]) (chute.store.writer)
    for a file that must be visible at once and durable soon (a stage's done-mark). A
    `path` that is a folder fails with EISDIR and leaves no temp behind."""
    tmp = write_temp(path, data, 0o644)
    try:
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class Unsynced:
    """Files put in place by write_volatile and folders that gained names, not durable yet:
    `sync()` them here, or hand them to Committer.submit(synced=files, folders=folders)
    (chute.store.writer)."""

    files: list[Path] = field(default_factory=list)
    folders: set[Path] = field(default_factory=set)

    def sync(self) -> None:
        fsync_each(self.files)
        for exc in sync_folders(self.folders | {path.parent for path in self.files}).values():
            raise exc


def fsync_each(paths: list[Path], *, missing_ok: bool = False) -> list[Path]:
    """fsync every path (files or folders); returns those synced (with `missing_ok`, a path
    gone since is skipped). The first other error is raised.

    A batch smaller than PARALLEL_FROM is synced one path after another: a disk that keeps
    up gains nothing from threads, and the loop needs the CPU and the GIL they would take.
    A bigger batch means the disk is behind (the batch grew while the previous one synced):
    its fsyncs then overlap from SYNC_THREADS threads, which a disk serves faster than the
    same fsyncs one after another."""
    errors = fsync_all(paths)
    for path in paths:
        exc = errors.get(path)
        if exc is not None and not (missing_ok and isinstance(exc, FileNotFoundError)):
            raise exc
    return [path for path in paths if path not in errors]


def fsync_all(paths: list[Path]) -> dict[Path, OSError]:
    """fsync every path (fsync_each's pacing); the errors, by path, none raised."""

    def one(path: Path) -> OSError | None:
        try:
            fsync_path(path)
        except OSError as exc:
            return exc
        return None

    results = map(one, paths) if len(paths) < PARALLEL_FROM else _sync_pool().map(one, paths)
    return {path: exc for path, exc in zip(paths, results, strict=True) if exc is not None}


def _sync_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="chute-fsync")
        return _pool


def sync_folders(folders: Iterable[Path]) -> dict[Path, OSError]:
    """fsync each folder once, deepest first (a new subfolder's own names before its name);
    the errors, by folder (none raised)."""
    by_depth: dict[int, list[Path]] = {}
    for folder in folders:
        by_depth.setdefault(len(folder.parts), []).append(folder)
    errors: dict[Path, OSError] = {}
    for depth in sorted(by_depth, reverse=True):
        errors.update(fsync_all(by_depth[depth]))
    return errors


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically: create a temp symlink, rename it over the old one
    (never unlink then create). Not synced: the `latest` links may point at an older run
    after a power loss, never at none."""
    tmp = _tmp_name(link)
    try:
        os.symlink(target, tmp)
    except FileExistsError:  # left by a crash of this pid's predecessor
        os.unlink(tmp)
        os.symlink(target, tmp)
    os.rename(tmp, link)


def remove_temp_leftovers(folder: Path) -> int:
    """Delete `.tmp-*` files a crash left in `folder`; returns how many.

    A temp name ends with its writer's pid: one whose writer still lives (another process,
    such as a `chute cancel` writing its request into control/ while the daemon starts) is
    being written, and is left alone. A recycled pid only keeps a leftover for a later pass."""
    count = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX) and not _writer_lives(entry.name):
            try:
                os.unlink(entry.path)
                count += 1
            except FileNotFoundError:
                pass
    return count


def _writer_lives(temp: str) -> bool:
    """Whether the process whose pid ends the temp name `temp` lives (not this one: nothing
    of ours is being written while a folder's leftovers are removed)."""
    pid = temp.rpartition(".")[2]
    if not pid.isdigit() or int(pid) in (0, os.getpid()):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
