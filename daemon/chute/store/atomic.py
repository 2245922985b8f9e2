"""Durable writes: the only code that opens state files for writing.

Owns: write-to-temp, fsync, rename, fsync-the-folder; atomic symlink replacement;
group commit of many files at once, by fsyncs or, on a filesystem of chute's own, syncfs(2).
Crash safety: a reader sees the old file or the new one, never a mix; after `write_*`
returns, the new name survives power loss (its folder was fsynced). A temp leftover
from a crash starts with `.tmp-` and is ignored by every reader; it ends with its writer's
pid, so a cleanup leaves a live writer's temp alone (remove_temp_leftovers).
Temp files are created with O_EXCL|O_NOFOLLOW: a run folder is a task's to scribble in,
and a FIFO or a link a task put at a temp name must neither block a write nor redirect it.
Diagnostics: OSError propagates to the caller, which knows the handover that failed; the
Committer sorts what fails by its errno (environment_wide): an error about the filesystem
holds the batch and is retried, an error about one path drops that path (and the later
files of its scope) and is reported to the owner (`on_unwritten`).
Limits: a failed fsync is not retried on the same file (fsyncgate): the caller redoes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
RETRY_DELAY = 1.0
ABANDON_WAIT = 2.0  # seconds Committer.close waits for its thread after giving up
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


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_tmp(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a temp name beside `path` (not synced: write_many syncs them all).

    Created, never opened: whatever is at the temp name (a leftover of this pid's earlier
    life or of a failed write, or a FIFO or link a task put there) is removed first."""
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, _CREATE, mode)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, _CREATE, mode)
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
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
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
    durable: two syncs per batch instead of one per file and folder (a burst of runs
    writes about ten of those per run); the cost is that syncfs also writes back other
    processes' dirty data there, so it is for a spool on a filesystem of its own.

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
        if environment_wide(exc):
            raise exc
        record = Unwritten(path, exc, path)
        unwritten.append(record)
        failed.add(index)
        key = None if scope is None else scope(path)
        if key is not None and key not in doomed:
            doomed[key] = (index, record)

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
        mark_errors = {} if filesystems else _fsync_all(marks)
        for path, error in mark_errors.items():
            # In place already, so first in the order: one that fails dooms its scope.
            if not isinstance(error, FileNotFoundError):  # gone since: nothing to sync
                fail(-1, path, error)
        for i, (path, data) in enumerate(files):
            if dropped(i, path):
                continue
            try:
                staged[i] = _write_tmp(path, data, mode)
            except OSError as exc:
                fail(i, path, exc)
        to_sync = set(folders)
        if filesystems:
            for fd in filesystems:
                syncfs(fd)
        else:
            to_sync.update(p.parent for p in marks if p not in mark_errors)
            errors = _fsync_all(list(staged.values()))
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
            for folder, error in _sync_folders(to_sync).items():
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


def write_volatile(path: Path, data: bytes) -> None:
    """Atomic but not durable (no fsync): the new content is in place at once and survives
    the death of this process, not a power loss. Alone, for files rebuilt often (the
    daemon's status.json); followed by Committer.submit(synced=[path]) for a file that must
    be visible at once and durable soon (a stage's done-mark). A `path` that is a folder
    fails with EISDIR and leaves no temp behind."""
    tmp = _write_tmp(path, data, 0o644)
    try:
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class Unsynced:
    """Files put in place by write_volatile and folders that gained names, not durable yet:
    `sync()` them here, or hand them to Committer.submit(synced=files, folders=folders)."""

    files: list[Path] = field(default_factory=list)
    folders: set[Path] = field(default_factory=set)

    def sync(self) -> None:
        fsync_each(self.files)
        for exc in _sync_folders(self.folders | {path.parent for path in self.files}).values():
            raise exc


def fsync_each(paths: list[Path], *, missing_ok: bool = False) -> list[Path]:
    """fsync every path (files or folders); returns those synced (with `missing_ok`, a path
    gone since is skipped). The first other error is raised.

    A batch smaller than PARALLEL_FROM is synced one path after another: issuing a burst's
    small batches from a pool of threads made it ~10% slower on 2 cores (the loop needs the
    CPU and the GIL more than the disk needs the concurrency). A bigger batch means the
    disk is behind (the batch grew while the previous one synced): its fsyncs then overlap
    from SYNC_THREADS threads. On this project's 2-core machines (a disk that does 3,100
    fsyncs/s from one thread, 6,100 from four) that made a burst of 1,000 durable runs
    ~10% faster and drained a backlog of 0.5–1.4 s of call: stages' syncs, and made taking
    10,000 files that only queue ~20% slower (the threads' CPU and GIL are the loop's)."""
    errors = _fsync_all(paths)
    for path in paths:
        exc = errors.get(path)
        if exc is not None and not (missing_ok and isinstance(exc, FileNotFoundError)):
            raise exc
    return [path for path in paths if path not in errors]


def _fsync_all(paths: list[Path]) -> dict[Path, OSError]:
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


def _sync_folders(folders: Iterable[Path]) -> dict[Path, OSError]:
    """fsync each folder once, deepest first (a new subfolder's own names before its name);
    the errors, by folder (none raised)."""
    by_depth: dict[int, list[Path]] = {}
    for folder in folders:
        by_depth.setdefault(len(folder.parts), []).append(folder)
    errors: dict[Path, OSError] = {}
    for depth in sorted(by_depth, reverse=True):
        errors.update(_fsync_all(by_depth[depth]))
    return errors


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by name (a FIFO a task put there fails, EINVAL, at once)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
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


class Committer:
    """Group commit in a writer thread, so the caller's loop never waits for a disk.

    Batches are committed one after another in the order they were submitted, each with
    `commit`, so a file submitted after another is never durable before it. While one
    batch syncs, the next one grows: the busier the loop, the fewer syncs per file.
    A batch that fails for want of a filesystem (ENOSPC, EIO: environment_wide) is logged
    once and retried whole every RETRY_DELAY seconds, keeping later batches behind it:
    nothing is acknowledged out of order or lost while the process lives. A path that fails
    on its own (a run folder removed, a folder where a file goes) is dropped from its batch
    with the later files of its scope and handed to `on_unwritten`; the rest lands and
    nothing waits for it. `on_done` callbacks run in the writer thread after the batch they
    came with is done, `unwritten_scopes` telling them which scopes lost a file in it.
    """

    def __init__(
        self,
        name: str = "chute-writer",
        syncfs: Sequence[Path] = (),
        *,
        scope: Callable[[Path], Hashable | None] | None = None,
        on_unwritten: Callable[[list[Unwritten]], None] | None = None,
    ) -> None:
        """`syncfs`: roots of filesystems chute has to itself (own_filesystems); every
        batch then costs two syncfs(2) each, whatever its size. `scope` and `on_unwritten`:
        see `commit`; `on_unwritten` is called in the writer thread (without it, each path
        is one ERROR line)."""
        self._filesystems = _open_roots(syncfs)
        self._next_filesystems: list[int] | None = None
        self._scope = scope
        self._on_unwritten = on_unwritten
        self._cond = threading.Condition()
        self._files: list[tuple[Path, bytes]] = []
        self._folders: set[Path] = set()
        self._callbacks: list[Callable[[], None]] = []
        self._synced: list[Path] = []
        self._submitted = 0
        self._committed = 0
        self._closing = False
        self._abandon = False  # close() ran out of time: give up what is not written
        self.error: OSError | None = None
        self.unwritten_scopes: dict[Hashable, Unwritten] = {}
        """While a batch's `on_done` callbacks run: its scopes that lost a file, each with
        the first such file."""
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

    def close(self, timeout: float | None = None) -> bool:
        """Write what was submitted, then stop the writer thread. With `timeout`, give up
        after that many seconds (writes failing for want of a filesystem): what is not
        written is then named in one ERROR line and lost, so its owner must be able to redo
        it (the daemon's runs resume from queue/). False when something was given up."""
        landed = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._abandon = not landed
            self._cond.notify_all()
        self._thread.join(None if landed else ABANDON_WAIT)
        if self._thread.is_alive():
            log.error("the writer thread is stuck in a write to the spool; exiting without it")
        else:
            _close_all(self._filesystems + (self._next_filesystems or []))
            self._filesystems, self._next_filesystems = [], None
        return landed

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._submitted > self._committed or self._closing)
                if self._abandon or (self._submitted == self._committed and self._closing):
                    self._give_up(self._files)
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
                    unwritten = commit(
                        _last_write_wins(files),
                        folders=folders,
                        synced=synced,
                        filesystems=self._filesystems,
                        scope=self._scope,
                    )
                    break
                except OSError as exc:
                    if self.error is None:
                        log.error(
                            "cannot write %s: %s (errno %s); holding %d file(s) in memory and "
                            "retrying every %.0fs: free space or fix the filesystem",
                            exc.filename or "the spool",
                            exc.strerror,
                            exc.errno,
                            len(files),
                            RETRY_DELAY,
                        )
                    self.error = exc
                    with self._cond:
                        if self._cond.wait_for(lambda: self._abandon, RETRY_DELAY):
                            self._give_up(files + self._files)
                            return
            if self.error is not None:
                log.warning("writes to the spool succeed again")
                self.error = None
            self._report(unwritten)
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    log.exception("callback after commit failed")
            self.unwritten_scopes = {}
            with self._cond:
                self._committed = upto
                self._cond.notify_all()

    def _report(self, unwritten: list[Unwritten]) -> None:
        scopes: dict[Hashable, Unwritten] = {}
        for u in unwritten:
            key = None if self._scope is None else self._scope(u.path)
            if key is not None:
                scopes.setdefault(key, u)
        self.unwritten_scopes = scopes
        if not unwritten:
            return
        if self._on_unwritten is None:
            for u in unwritten:
                log.error("cannot write %s: %s", u.path, u.error.strerror)
            return
        try:
            self._on_unwritten(unwritten)
        except Exception:
            log.exception("handling unwritten files failed")

    def _give_up(self, files: list[tuple[Path, bytes]]) -> None:
        if not files:
            return
        paths = list(dict.fromkeys(str(path) for path, _ in files))
        log.error(
            "exiting with %d file(s) not written (%s): %s%s",
            len(paths),
            self.error.strerror if self.error is not None else "shutting down",
            ", ".join(paths[:10]),
            ", ..." if len(paths) > 10 else "",
        )


def _open_roots(roots: Sequence[Path]) -> list[int]:
    return [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for root in roots]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _last_write_wins(files: list[tuple[Path, bytes]]) -> list[tuple[Path, bytes]]:
    """Drop earlier versions of a file written twice in one batch (a manifest, run.json)."""
    last = {path: i for i, (path, _) in enumerate(files)}
    return [f for i, f in enumerate(files) if last[f[0]] == i]
