"""A run: task's output: one pipe for its stdout and stderr, copied into its log up to a limit.

Owns: the task's output pipe and the copy of it into the log up to the log limit
(LogPipe), the note a capped log ends with (cap_note, for call: workers' logs too). Not
here: opening the log (chute.execution.runner.open_log), when the pipe is readable (the
caller's reactor, through chute.execution.local).

The log cap: a task's stdout and stderr are one pipe, not the log file, so a task that
writes without end cannot fill the disk. When the pipe has data, LogPipe.pump moves at
most CHUNK per event (splice(2), so the bytes never enter Python), until the log file holds
`log_limit` bytes; then it appends CAP_NOTE once and discards the rest (spliced to
/dev/null from a pipe grown to CHUNK, so a writer of gigabytes wakes the loop once per
CHUNK, not once per 64 KiB). Capping is not a failure. The Result never waits for EOF on
the pipe (a grandchild may hold it open): when the task's processes are gone, what is left
in the pipe is drained without blocking and the pipe is closed.
Crash safety: nothing durable is written here; the log is appended to as it grows.
Diagnostics: a log that cannot be written while the task runs (disk full) is one ERROR
line; the task's further output is discarded.
Limits: the limit is on the log file, earlier attempts included: a retry after a capped
attempt keeps only its own note. A process that writes after its task's Result (one that
survived SIGKILL) gets SIGPIPE.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os

from chute.units import format_size

log = logging.getLogger(__name__)

DEFAULT_LOG_LIMIT = 64 << 20
"""Bytes a task's log may hold (the config's `log_limit`); the rest of its output is dropped."""

CAP_NOTE = "\n--- chute: log capped at {limit}; the rest of the output was discarded ---\n"

CHUNK = 1 << 20  # bytes moved per readable event; the discard pipe is grown to this size
DRAIN_STEPS = 64  # pipe reads at the Result, for data still buffered (bounded: see drain)


def cap_note(limit: int) -> bytes:
    """The line a capped log ends with."""
    return CAP_NOTE.format(limit=format_size(limit)).encode()


class LogPipe:
    """A task's stdout and stderr: a pipe whose data goes to the log, up to `limit` bytes.

    `write_fd` is for the child (dup'ed to its fds 1 and 2), closed here once it started.
    `read_fd` is non-blocking and close-on-exec; the executor calls `pump` when it is
    readable, and `drain` once the task's processes are gone.
    """

    def __init__(self, key: str, path: str, limit: int, log_fd: int):
        """`log_fd`: the log `path`, open at its end (chute.execution.runner.open_log); it is
        this LogPipe's once the pipe is made (OSError, when it cannot be: the caller's)."""
        self.key = key
        self.path = path
        self.limit = limit
        self.size = os.fstat(log_fd).st_size
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self.log_fd = log_fd
        os.set_blocking(self.read_fd, False)
        self.open = True
        self.splice = True  # until the log's filesystem refuses it
        self.sealed = False  # nothing more goes into the log (capped, or it failed)
        self.discarding = False  # the pipe is grown and /dev/null open
        self.null_fd = -1

    def child_started(self) -> None:
        os.close(self.write_fd)
        self.write_fd = -1

    def pump(self) -> bool:
        """Move what the pipe holds (at most CHUNK) to the log, or away; False at EOF."""
        try:
            return self._move() != 0
        except BlockingIOError:
            return True

    def drain(self) -> None:
        """What the pipe still holds, without blocking, then close it.

        Bounded: a writer that outlived its task (stuck in the kernel through SIGKILL, or
        one that got the pipe passed over a socket) cannot keep the daemon here.
        """
        if self.open:
            with contextlib.suppress(BlockingIOError):
                for _ in range(DRAIN_STEPS):
                    if self._move() == 0:
                        break
        self.close()

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        for fd in (self.read_fd, self.write_fd, self.log_fd, self.null_fd):
            if fd >= 0:
                os.close(fd)

    def _move(self) -> int:
        """Bytes moved (0 at EOF); BlockingIOError when the pipe is empty."""
        if self.size < self.limit and not self.sealed:
            return self._copy(min(CHUNK, self.limit - self.size))
        return self._discard()

    def _copy(self, count: int) -> int:
        try:
            if self.splice:
                try:
                    n = os.splice(self.read_fd, self.log_fd, count)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.splice = False  # a filesystem without splice: copy through here
            if not self.splice:
                data = os.read(self.read_fd, count)
                n = len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(self.log_fd, view) :]
        except BlockingIOError:
            raise
        except OSError as exc:
            self.sealed = True
            log.error(
                "task %s cannot write its log %s: %s; discarding the rest of its output",
                self.key,
                self.path,
                exc.strerror,
            )
            return self._discard()
        self.size += n
        return n

    def _discard(self) -> int:
        if not self.discarding:
            self.discarding = True
            # One event per MiB instead of per 64 KiB; refused (EPERM) when the user's
            # pipes are over /proc/sys/fs/pipe-user-pages-soft, which is harmless.
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.read_fd, fcntl.F_SETPIPE_SZ, CHUNK)
            with contextlib.suppress(OSError):
                self.null_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        n = -1
        if self.null_fd >= 0:
            try:
                n = os.splice(self.read_fd, self.null_fd, CHUNK)
            except BlockingIOError:
                raise
            except OSError:
                os.close(self.null_fd)
                self.null_fd = -1
        if n < 0:
            n = len(os.read(self.read_fd, CHUNK))
        if n and not self.sealed:
            self.sealed = True  # the note is written once
            try:
                os.write(self.log_fd, cap_note(self.limit))
            except OSError as exc:
                log.error("task %s cannot write its log %s: %s", self.key, self.path, exc.strerror)
        return n
