"""Judging one dropped file through one descriptor: its bytes, or why it is refused.

Owns: opening a file of incoming/ (or a claim, or a file of rejected/) without following a
link or blocking on a FIFO, the read lease that tells a file still open for writing, and the
refusals fstat decides: not a regular file, more than one name, too large, world-writable,
an owner outside `submitters` (chute.intake.access). Not here: what the bytes mean
(chute.spec), where the file goes (chute.intake.drops, chute.intake.decision).
Crash safety: reads only. The bytes returned are the ones read through the descriptor that
was judged, so a writer that kept a descriptor cannot change what is decided on.
Diagnostics: a refusal is an Inspection with a reason (one word, for metrics) and an Issue
that says what to do; a file that vanished raises Gone, one still being written NotReady;
neither is logged here. Without leases, one INFO line, once.
Limits: the lease needs CAP_LEASE or the file's ownership; without it (EACCES), on
filesystems without leases (EINVAL: NFS, FUSE) and when no lease is asked for (recovery),
"still being written" is judged by size and mtime only.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from chute.config import Config
from chute.intake import access
from chute.spec import Issue
from chute.spec.load import read_upto
from chute.units import format_size

log = logging.getLogger(__name__)

_LEASE_SIGNAL = signal.SIGURG
"""A broken lease is announced by a signal, SIGIO unless set, whose default action ends the
process: SIGURG's default is to ignore it, and the lease is checked with F_GETLEASE anyway."""


class Gone(Exception):
    """The file vanished under us (moved or removed): a benign race."""


class NotReady(Exception):
    """Still open for writing, or changed while we read it: a later event retakes it."""


@dataclass(frozen=True, slots=True)
class Inspection:
    """What one open descriptor told us: the bytes, or why the file is refused."""

    st: os.stat_result
    data: bytes
    reason: str | None = None
    issues: tuple[Issue, ...] = ()


class Inspector:
    """Inspects files one at a time; remembers only that it said leases are unavailable."""

    def __init__(self) -> None:
        self._lease_warned = False

    def inspect(self, path: Path, display: str, config: Config, *, lease: bool) -> Inspection:
        """Judge `path` (`display` in issues) without following or blocking, and read it if
        it may be a spec. `lease`: refuse, as not ready, a file someone has open for writing."""

        def refuse(reason: str, st: os.stat_result, message: str) -> Inspection:
            return Inspection(st, b"", reason, (Issue(display, 0, "", message),))

        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            raise Gone from None
        if stat.S_ISLNK(lst.st_mode):
            return refuse("symlink", lst, "is a symbolic link; drop the file itself, not a link")
        if not stat.S_ISREG(lst.st_mode):
            return refuse("not_regular", lst, _not_regular(lst.st_mode))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Gone from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return refuse("symlink", lst, "is a symbolic link; drop the file itself")
            if exc.errno == errno.ENXIO:  # became a socket after lstat
                return refuse("not_regular", lst, "is a socket, not a regular file")
            return refuse("unreadable", lst, _unreadable("open", exc))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped after lstat; O_NONBLOCK kept us going
                return refuse("not_regular", st, _not_regular(st.st_mode))
            leased = lease and self._lease(fd)
            try:
                problem = _refusal(st, config)
                if problem is not None:
                    return refuse(problem[0], st, problem[1])
                try:
                    data = read_upto(fd, config.max_file_size + 1)
                except OSError as exc:
                    return refuse("unreadable", st, _unreadable("read", exc))
                after = os.fstat(fd)
                if leased and fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
                    raise NotReady("opened for writing while being read")
                if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or len(
                    data
                ) != st.st_size:
                    raise NotReady("changed while being read")
                return Inspection(st, data)
            finally:
                if leased:
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        finally:
            os.close(fd)

    def _lease(self, fd: int) -> bool:
        """Take a read lease: it fails while anyone has the file open for writing."""
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_SIGNAL)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                raise NotReady("still open for writing") from None
            if not self._lease_warned:  # EACCES without CAP_LEASE, EINVAL on NFS and FUSE
                self._lease_warned = True
                log.info(
                    "intake cannot take read leases (%s); judging files still being written "
                    "by size and mtime only: run the daemon with CAP_LEASE for the lease check",
                    exc.strerror,
                )
            return False


def _refusal(st: os.stat_result, config: Config) -> tuple[str, str] | None:
    """The reason and message to refuse a regular file for, from fstat alone."""
    limit = config.max_file_size
    if st.st_nlink > 1:
        return "not_regular", (
            f"has {st.st_nlink} hard links; a dropped file must have only its own name "
            "— write a new file, then rename it into incoming/"
        )
    if st.st_size > limit:
        return "too_large", (
            f"is {format_size(st.st_size)} ({st.st_size} bytes), over the limit of "
            f"{format_size(limit)} ({limit} bytes); a spec is small — pass big data by "
            "reference, or raise max_file_size in the config"
        )
    if st.st_mode & stat.S_IWOTH:
        return "world_writable", (
            f"is world-writable (mode {stat.S_IMODE(st.st_mode):04o}); anyone could change "
            "it after it was checked — chmod o-w it, then drop it again"
        )
    problem = access.submitter_refusal(st.st_uid, config)
    return None if problem is None else ("not_submitter", problem)


def _not_regular(mode: int) -> str:
    if stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    else:
        kind = "a special file"
    return f"is {kind}, not a regular file; drop a YAML file"


def _unreadable(op: str, exc: OSError) -> str:
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    return f"cannot {op}: {exc.strerror}; make it readable by the daemon's user ({user})"
