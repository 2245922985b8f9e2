"""Opening files in a run folder, where a task may have put anything in their place.

Owns: how chute opens and reads a file a task could have replaced (its log, CHUTE_OUTPUT,
the run's own JSON files, cache entries): never following a link, never blocking (a FIFO
with no writer, a device), used only when fstat of the open descriptor says a regular
file, and read within a bound. Also what such a path is called in a message ("a FIFO").
Not here: writing (chute.store.atomic, whose temp files are created, never opened), listing a
task's artifacts (chute.store.outputs), what a failure means for the attempt or the run
(chute.execution.runner, chute.engine).
Crash safety: nothing is written here.
Diagnostics: a path that is not a regular file raises NotRegular, a file over its bound
TooBig; both are OSErrors, so a caller that turns every OSError into the attempt's error
(`<what> <path>: <strerror>`) gets one line that says what is there.
Limits: open_regular checks the last component, not the folders above it: a task that
swaps one of those for a link while chute reads is reading files its own user could read
anyway. open_beneath checks every component, for what chute copies into another run.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

# A path a task replaced is told apart from other errors after a failed open: O_NOFOLLOW on
# a link gives ELOOP, a write-only open of a FIFO without a reader ENXIO, of a folder EISDIR.
_REPLACED = frozenset({errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENODEV})


def kind(mode: int) -> str:
    """What a file of this st_mode is, for messages: `a FIFO`, `a directory`, ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


class NotRegular(OSError):
    """A path where a regular file belongs holds something else; `strerror` says what
    (`is a FIFO, not a regular file`)."""

    def __init__(self, path: str, mode: int):
        super().__init__(errno.EINVAL, f"is {kind(mode)}, not a regular file", path)
        self.kind = kind(mode)


class TooBig(OSError):
    """A regular file over the bound it is read within; `size` is what it had."""

    def __init__(self, path: str, size: int, limit: int):
        super().__init__(errno.EFBIG, f"is {size} bytes, over the {limit}-byte limit", path)
        self.size = size


def open_regular(path: str, flags: int, mode: int = 0o644) -> int:
    """os.open(path, flags) for a regular file only (created if `flags` say so): a link,
    FIFO, socket, folder or device at `path` raises NotRegular without being followed,
    opened for long, or blocked on. The descriptor is close-on-exec and blocking."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass  # created below, or FileNotFoundError from the open
    else:
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(path, st.st_mode)  # a device is never even opened
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in _REPLACED:  # replaced since the lstat
            try:
                st = os.lstat(path)
            except OSError:
                raise exc from None
            if not stat.S_ISREG(st.st_mode):
                raise NotRegular(path, st.st_mode) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(path, st.st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, limit: int) -> bytes:
    """The content of the regular file at `path`, at most `limit` bytes; FileNotFoundError
    when there is none, NotRegular, TooBig (also for a file that grows while it is read),
    or the OSError of the read."""
    fd = open_regular(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise TooBig(path, size, limit)
        chunks = []
        total = 0
        while chunk := os.read(fd, limit + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # it grew after fstat: a process still writes
                raise TooBig(path, total, limit)
        return b"".join(chunks)
    finally:
        os.close(fd)


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""Opening a folder of a run without following a link (ELOOP, or ENOTDIR, when one is there)."""


def open_beneath(root: Path, parts: tuple[str, ...], flags: int = 0) -> int:
    """Open root/parts[0]/…/parts[-1] without following a symlink at any step (ELOOP or
    ENOTDIR when one is there); the last part with `flags` (default: a file to read, never
    blocking: a FIFO opens, and fstat says what it is)."""
    fd = os.open(root, DIR_FLAGS)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        last_flags = flags or (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        return os.open(parts[-1], last_flags, dir_fd=fd)
    finally:
        os.close(fd)
