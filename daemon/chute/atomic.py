"""Durable writes: the only code that opens state files for writing.

Owns: write-to-temp, fsync, rename, fsync-the-folder; atomic symlink replacement;
group commit of many files at once, by fsyncs or, on a filesystem of chute's own, syncfs(2).
Crash safety: a reader sees the old file or the new one, never a mix; after `write_*`
returns, the new name survives power loss (its folder was fsynced). A temp leftover
from a crash starts with `.tmp-` and is ignored by every reader.
Diagnostics: OSError propagates to the caller, which knows the handover that failed.
Limits: a failed fsync is not retried on the same file (fsyncgate): the caller redoes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
RETRY_DELAY = 1.0
PARALLEL_FROM = 16  # paths in one batch from which their fsyncs overlap (fsync_each)
SYNC_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make the names in `folder` durable (a new or renamed entry needs this)."""
    fsync_path(folder)


def _write_tmp(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a temp name beside `path` (not synced: write_many syncs them all)."""
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return tmp


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically and durably replace `path` with `data`."""
    write_many([(path, data)], mode)


def drop(path: Path, data: bytes) -> None:
    """write_bytes into a drop box (incoming/, control/): under systemd a member of the submit
    group may create and rename there but not read the folder, so cannot fsync it. The file
    is still written to a temp name, synced and renamed; the folder's name is then synced by
    the daemon when it takes the file (intake fsyncs incoming/ with every claim)."""
    tmp = _write_tmp(path, data, 0o644)
    fsync_path(tmp)
    os.rename(tmp, path)
    try:
        fsync_dir(path.parent)
    except PermissionError:
        pass


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
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
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


def write_json(path: Path, obj: object) -> None:
    write_bytes(path, dumps(obj))


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


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
    callers list the file that acknowledges the others last.
    """
    staged = [(_write_tmp(path, data, mode), path) for path, data in files]
    done = fsync_each([tmp for tmp, _ in staged] + list(synced), missing_ok=True)
    to_sync = set(folders)
    to_sync.update(path.parent for path in done)
    for tmp, path in staged:
        os.rename(tmp, path)
    _sync_folders(to_sync)


def write_many_syncfs(files: Iterable[tuple[Path, bytes]], filesystems: Sequence[int]) -> None:
    """write_many for files on `filesystems` (a descriptor of each), which chute has to
    itself: every temp is written, one syncfs(2) per filesystem makes them (and whatever
    else waits to be synced there: files put in place by write_volatile, new folders)
    durable, the temps are renamed, and a second syncfs makes the names durable.

    Two syncs per batch instead of one per file and folder: a burst of runs writes about
    ten of those per run. The cost: syncfs also writes back other processes' dirty data on
    that filesystem, so it is for a spool on a filesystem of its own (config `sync`)."""
    staged = [(_write_tmp(path, data, 0o644), path) for path, data in files]
    for fd in filesystems:
        syncfs(fd)
    if staged:
        for tmp, path in staged:
            os.rename(tmp, path)
        for fd in filesystems:
            syncfs(fd)


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


def write_volatile(path: Path, data: bytes) -> None:
    """Atomic but not durable (no fsync): the new content is in place at once and survives
    the death of this process, not a power loss. Alone, for files rebuilt often (the
    daemon's status.json); followed by Committer.submit(synced=[path]) for a file that must
    be visible at once and durable soon (a stage's done-mark)."""
    os.rename(_write_tmp(path, data, 0o644), path)


@dataclass
class Unsynced:
    """Files put in place by write_volatile and folders that gained names, not durable yet:
    `sync()` them here, or hand them to Committer.submit(synced=files, folders=folders)."""

    files: list[Path] = field(default_factory=list)
    folders: set[Path] = field(default_factory=set)

    def sync(self) -> None:
        fsync_each(self.files)
        _sync_folders(self.folders | {path.parent for path in self.files})


def fsync_each(paths: list[Path], *, missing_ok: bool = False) -> list[Path]:
    """fsync every path (files or folders); returns those synced (with `missing_ok`, a path
    gone since is skipped).

    A batch smaller than PARALLEL_FROM is synced one path after another: issuing a burst's
    small batches from a pool of threads made it ~10% slower on 2 cores (the loop needs the
    CPU and the GIL more than the disk needs the concurrency). A bigger batch means the
    disk is behind (the batch grew while the previous one synced): its fsyncs then overlap
    from SYNC_THREADS threads. On this project's 2-core machines (a disk that does 3,100
    fsyncs/s from one thread, 6,100 from four) that made a burst of 1,000 durable runs
    ~10% faster and drained a backlog of 0.5–1.4 s of call: stages' syncs, and made taking
    10,000 files that only queue ~20% slower (the threads' CPU and GIL are the loop's)."""

    def one(path: Path) -> Path | None:
        try:
            fsync_path(path)
        except FileNotFoundError:
            if not missing_ok:
                raise
            return None
        return path

    synced = map(one, paths) if len(paths) < PARALLEL_FROM else _sync_pool().map(one, paths)
    return [path for path in synced if path is not None]


def _sync_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="chute-fsync")
        return _pool


def _sync_folders(folders: Iterable[Path]) -> None:
    """fsync each folder once, deepest first (a new subfolder's own names before its name)."""
    by_depth: dict[int, list[Path]] = {}
    for folder in folders:
        by_depth.setdefault(len(folder.parts), []).append(folder)
    for depth in sorted(by_depth, reverse=True):
        fsync_each(by_depth[depth])


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Delete `.tmp-*` files a crash left in `folder`; returns how many."""
    count = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX):
            try:
                os.unlink(entry.path)
                count += 1
            except FileNotFoundError:
                pass
    return count


class Committer:
    """Group commit in a writer thread, so the caller's loop never waits for a disk.

    Batches are committed one after another in the order they were submitted, each with
    `write_many`, so a file submitted after another is never durable before it. While one
    batch syncs, the next one grows: the busier the loop, the fewer syncs per file.
    A batch that fails (ENOSPC, EIO) is logged once and retried whole every RETRY_DELAY
    seconds, keeping later batches behind it: nothing is acknowledged out of order or lost
    while the process lives. `on_done` callbacks run in the writer thread after the batch
    they came with is durable.
    """

    def __init__(self, name: str = "chute-writer", syncfs: Sequence[Path] = ()) -> None:
        """`syncfs`: roots of filesystems chute has to itself (own_filesystems); every
        batch then costs two syncfs(2) each, whatever its size (write_many_syncfs)."""
        self._filesystems = _open_roots(syncfs)
        self._next_filesystems: list[int] | None = None
        self._cond = threading.Condition()
        self._files: list[tuple[Path, bytes]] = []
        self._folders: set[Path] = set()
        self._callbacks: list[Callable[[], None]] = []
        self._synced: list[Path] = []
        self._submitted = 0
        self._committed = 0
        self._closing = False
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self,
        files: Iterable[tuple[Path, bytes]],
        folders: Iterable[Path] = (),
        on_done: Callable[[], None] | None = None,
        synced: Iterable[Path] = (),
    ) -> None:
        """Commit `files`; also fsync `synced` (already in place by write_volatile) and their
        folders before any of `files` is renamed, so they are durable before what follows."""
        with self._cond:
            self._files.extend(files)
            self._folders.update(folders)
            self._synced.extend(synced)
            if on_done is not None:
                self._callbacks.append(on_done)
            self._submitted += 1
            self._cond.notify_all()

    def use_syncfs(self, roots: Sequence[Path]) -> None:
        """Switch how batches are synced (config reload), from the next batch on."""
        fds = _open_roots(roots)
        with self._cond:
            if self._next_filesystems is not None:
                _close_all(self._next_filesystems)
            self._next_filesystems = fds

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is durable; False on timeout."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._committed >= target, timeout)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        _close_all(self._filesystems + (self._next_filesystems or []))
        self._filesystems, self._next_filesystems = [], None

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._submitted > self._committed or self._closing)
                if self._submitted == self._committed and self._closing:
                    return
                files, self._files = self._files, []
                folders, self._folders = self._folders, set()
                callbacks, self._callbacks = self._callbacks, []
                synced, self._synced = list(dict.fromkeys(self._synced)), []
                upto = self._submitted
                if self._next_filesystems is not None:
                    _close_all(self._filesystems)
                    self._filesystems, self._next_filesystems = self._next_filesystems, None
            while True:
                try:
                    # A synced path gone since (replaced, removed) has nothing left to sync.
                    if self._filesystems:
                        write_many_syncfs(_last_write_wins(files), self._filesystems)
                    else:
                        write_many(_last_write_wins(files), folders=folders, synced=synced)
                    break
                except OSError as exc:
                    if self.error is None:
                        log.error(
                            "cannot write %s: %s (errno %s); holding %d file(s) in memory and "
                            "retrying every %.0fs: free space or fix permissions",
                            exc.filename or "the spool",
                            exc.strerror,
                            exc.errno,
                            len(files),
                            RETRY_DELAY,
                        )
                    self.error = exc
                    time.sleep(RETRY_DELAY)
            if self.error is not None:
                log.warning("writes to the spool succeed again")
                self.error = None
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    log.exception("callback after commit failed")
            with self._cond:
                self._committed = upto
                self._cond.notify_all()


def _open_roots(roots: Sequence[Path]) -> list[int]:
    return [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for root in roots]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _last_write_wins(files: list[tuple[Path, bytes]]) -> list[tuple[Path, bytes]]:
    """Drop earlier versions of a file written twice in one batch (a manifest, run.json)."""
    last = {path: i for i, (path, _) in enumerate(files)}
    return [f for i, f in enumerate(files) if last[f[0]] == i]
