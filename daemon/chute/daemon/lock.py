"""The spool lock: one daemon per spool, and the CLI's short holds of it.

Owns: state/lock (an flock held for the daemon's life, its pid written in it), and the one
line a daemon that cannot use its spool says. Not here: what a dead owner left running
(chute.execution.owners).
Crash safety: the kernel drops an flock with its process, so a crashed daemon's lock is
free at once; the pid in the file is for messages only, never trusted to be alive.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from chute.engine.runs import submitter
from chute.store.spool import Spool


class SpoolLocked(Exception):
    """Another daemon owns this spool."""


def unwritable(spool: Spool, exc: OSError) -> str:
    """One line for a spool folder the daemon cannot write, with what to do."""
    where = exc.filename or str(spool.root)
    if Path(where).is_relative_to(spool.runs) and not spool.runs.is_relative_to(spool.root):
        fix = "set runs_dir in the config to a writable folder"
    else:
        fix = "pass another --spool"
    code = errno.errorcode.get(exc.errno or 0, "?")
    return (
        f"cannot write {where}: {exc.strerror} ({code}); the daemon writes every folder of its "
        f"spool: make it writable by {submitter()['user'] or os.getuid()} and mounted "
        f"read-write, or {fix}"
    )


def lock_path(spool: Spool) -> Path:
    return spool.state / "lock"


LOCK_WAIT = 1.0  # seconds a starting daemon waits for a CLI command that holds the lock


def acquire_lock(spool: Spool) -> int:
    """Hold state/lock for the daemon's life; SpoolLocked names the holder. A CLI command
    that acts without a daemon holds the lock for a moment (lock_if_free): that is waited
    for, up to LOCK_WAIT."""
    fd = os.open(lock_path(spool), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SpoolLocked(
            f"another chute daemon (pid {holder}) already runs on {spool.root}; "
            "one daemon per spool (stop it, or use another --spool)"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def daemon_pid(spool: Spool) -> int | None:
    """The pid of the daemon holding this spool, or None when none does."""
    try:
        fd = os.open(lock_path(spool), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def lock_if_free(spool: Spool) -> int | None:
    """For a CLI command that changes runs without a daemon: hold state/lock (close the
    returned fd to let go), so no daemon starts and resumes a run meanwhile; None when a
    daemon holds it."""
    try:
        fd = os.open(lock_path(spool), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # no state/ yet: no daemon ever ran here
        spool.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(spool), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
