"""One `run:` task as a process group: spawn it pinned, watch its deadline, end it.

Owns: one task's folders (Task.folders), its main process (a Popen in its own process
group, and in its own cgroup when it has one: a shell joins it before the command runs,
chute.execution.cgroups.join_argv) and its pidfd, the task's deadline and its SIGTERM → grace →
SIGKILL escalation (the SIGKILL to its process group and its cgroup),
the task's output pipe and the copy of it into the log up to the log limit (LogPipe), and
turning the exit into a Result (CHUTE_OUTPUT read, checked and removed).
Not here: the selector loop and the orphan sweep (chute.execution.local), `call:` tasks
(chute.execution.pool).

The log cap: a task's stdout and stderr are one pipe, not the log file, so a task that
writes without end cannot fill the disk. The executor's selector says when the pipe has
data; LogPipe.pump moves at most 1 MiB per event (splice(2), so the bytes never enter
Python), until the log file holds `log_limit` bytes; then it appends CAP_NOTE once and
discards the rest (spliced to /dev/null from a pipe grown to 1 MiB: a writer of 1 GB costs
the daemon about 0.2 s of CPU, 1 s with the default 64 KiB pipe). Capping is not a
failure. The Result never waits for EOF on the pipe (a grandchild may hold it open): when
the task's processes are gone, what is left in the pipe is drained without blocking and
the pipe is closed.

Crash safety: nothing durable is written here. The log is opened at its end (without
O_APPEND, which splice refuses; the daemon is its only writer while the task runs), so a
retry or a restarted daemon appends to what an earlier attempt wrote; CHUTE_OUTPUT is
removed only after it has been read into the Result.
Diagnostics: a task's own failure (exit code, signal, timeout, bad output) is the Result's
one-line `error`, never a log line of ours. A task that cannot start (missing program,
missing cwd, unwritable log, bad cores) is a Result with an error naming the path and the
errno text, so the engine records it like any failed attempt. A task's folder is hostile
input: its log and CHUTE_OUTPUT are opened through chute.store.taskfiles (a FIFO, folder or link
a task put there fails the attempt with a reason that says what is there; nothing blocks).
A log that cannot be written while the task runs (disk full) is one ERROR line; the task's
further output is discarded.
Limits: the group is signalled only while the main process is an unreaped zombie or alive,
so its pgid cannot have been recycled; processes that left the group are found by the
orphan sweep in chute.execution.local, not here. The limit is on the log file, earlier attempts
included: a retry after a capped attempt keeps only its own note. A running task holds
three descriptors of the daemon (pidfd, pipe, log). A process that writes after its task's
Result (one that survived SIGKILL) gets SIGPIPE.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Literal

import orjson

from chute.execution import cgroups, procfs
from chute.execution.executor import MAX_OUTPUT_BYTES, OUTPUT_TOO_BIG, Result, Task
from chute.store import atomic, taskfiles
from chute.units import format_size

log = logging.getLogger(__name__)

DEFAULT_LOG_LIMIT = 64 << 20
"""Bytes a task's log may hold (the config's `log_limit`); the rest of its output is dropped."""

CAP_NOTE = "\n--- chute: log capped at {limit}; the rest of the output was discarded ---\n"

CHUNK = 1 << 20  # bytes moved per selector event; the discard pipe is grown to this size
DRAIN_STEPS = 64  # pipe reads at the Result, for data still buffered (bounded: see drain)

StopReason = Literal["timeout", "cancel"]


class SpawnError(Exception):
    """The task could not be started; the message is the Result's error."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        # About the filesystem (no room, read-only, EIO): not the task's fault (see Result).
        self.no_room = errno_ if errno_ in atomic.ENVIRONMENT_WIDE else None

    def result(self, key: str) -> Result:
        """The Result of a task that could not start: failed, or lost for want of a
        writable spool."""
        return Result(key=key, error=str(self), lost=self.no_room is not None, no_room=self.no_room)


def span(seconds: float) -> str:
    """`20m`, `10s`, `0.5s`, `1h`: the spec's own duration forms, for messages."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


def describe_end(returncode: int) -> str:
    """`exited with code 3` or `killed by signal 9 (SIGKILL)` for a Popen-style code."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"killed by signal {signum}"
    return f"killed by signal {signum} ({name})"


def stop_message(reason: StopReason, timeout: float | None, grace: float, sigkill: bool) -> str:
    head = f"timed out after {span(timeout or 0.0)}" if reason == "timeout" else "cancelled"
    how = f"SIGTERM, then SIGKILL after {span(grace)}" if sigkill else "SIGTERM"
    return f"{head} ({how})"


def read_output(path: str) -> tuple[bytes | None, str | None]:
    """The JSON a task left at CHUTE_OUTPUT (removed once read), or the reason it is unusable.

    The task may have put anything there (taskfiles.open_regular decides what is read); what
    it left is removed, but for a non-empty folder, which the reason names.
    """
    try:
        data = taskfiles.read_regular(path, MAX_OUTPUT_BYTES)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        _remove(path)
        if isinstance(exc, taskfiles.TooBig):
            return None, OUTPUT_TOO_BIG.format(size=exc.size)
        if isinstance(exc, taskfiles.NotRegular):
            return None, (
                f"CHUTE_OUTPUT {path} {exc.strerror}; write the JSON output as a file at that path"
            )
        return None, f"cannot read CHUTE_OUTPUT {path}: {exc.strerror}"
    _remove(path)
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return None, f"CHUTE_OUTPUT is not valid JSON: {exc}"
    return data, None


def _remove(path: str) -> None:
    """Remove what a task left at `path` (an empty folder too), so the next attempt starts
    clean; what cannot be removed stays, and the next attempt's reason says what it is."""
    try:
        os.unlink(path)
    except IsADirectoryError:
        with contextlib.suppress(OSError):
            os.rmdir(path)
    except OSError:
        pass


def too_big_to_exec(argv: list[str], env: dict[str, str]) -> str:
    """Why exec said "Argument list too long": the sizes, and the biggest string by name."""
    sizes = {f"argument {i}": len(a.encode()) + 1 for i, a in enumerate(argv)}
    sizes.update({f"variable {k}": len(k.encode()) + len(v.encode()) + 2 for k, v in env.items()})
    biggest = max(sizes, key=sizes.__getitem__)
    return (
        f"cannot start {argv[0]}: its command and environment are {sum(sizes.values()):,} "
        f"bytes, over the kernel's limit (the biggest is {biggest}, {sizes[biggest]:,} bytes); "
        "put the data in a file and pass its path"
    )


def killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def cap_note(limit: int) -> bytes:
    """The line a capped log ends with."""
    return CAP_NOTE.format(limit=format_size(limit)).encode()


def make_folders(task: Task) -> None:
    """The folders the task asked for (Task.folders), those missing; SpawnError says why not."""
    for folder in task.folders:
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        except OSError as exc:
            raise SpawnError(f"cannot make folder {folder}: {exc.strerror}", exc.errno) from None


def open_log(path: str, *, append: bool = False) -> int:
    """A descriptor at the end of the log `path`, creating it and its folder; SpawnError
    says why not (a task may have put a FIFO, a folder or a link there: never followed nor
    waited on, see chute.store.taskfiles).

    O_APPEND only with `append` (a call: worker's fds 1 and 2): splice(2) refuses to write
    to such a file (EINVAL), so a run: task's log pipe gets a plain descriptor.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0)
    try:
        try:
            fd = taskfiles.open_regular(path, flags)
        except FileNotFoundError:  # the engine makes the folder; other callers may not
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd = taskfiles.open_regular(path, flags)
        os.lseek(fd, 0, os.SEEK_END)
    except taskfiles.NotRegular as exc:
        raise SpawnError(
            f"log {path} {exc.strerror}; remove it so the stage's output can be logged there"
        ) from None
    except OSError as exc:
        raise SpawnError(
            f"cannot open log {exc.filename or path}: {exc.strerror}", exc.errno
        ) from None
    return fd


class LogPipe:
    """A task's stdout and stderr: a pipe whose data goes to the log, up to `limit` bytes.

    `write_fd` is for the child (dup'ed to its fds 1 and 2), closed here once it started.
    `read_fd` is non-blocking and close-on-exec; the executor calls `pump` when it is
    readable, and `drain` once the task's processes are gone.
    """

    def __init__(self, key: str, path: str, limit: int):
        self.key = key
        self.path = path
        self.limit = limit
        self.log_fd = open_log(path)
        try:
            self.size = os.fstat(self.log_fd).st_size
            self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            os.close(self.log_fd)
            raise SpawnError(f"cannot make the output pipe for {path}: {exc.strerror}") from None
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


class RunProcess:
    """One started `run:` task: its process group, deadline, and (once reaped) its Result."""

    def __init__(
        self,
        task: Task,
        popen: subprocess.Popen[bytes],
        log: LogPipe,
        now: float,
        grace: float,
        cgroup: Path | None = None,
    ):
        self.task = task
        self.cgroup = cgroup  # the task's own cgroup (chute.execution.cgroups), when it has one
        self.cgroup_killed_at: float | None = None  # SIGKILL for what was left in it
        self.log = log
        self.key = task.key
        self.popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid  # process_group=0: the main process leads its own group
        self.pidfd = os.pidfd_open(popen.pid)
        self.grace = grace
        self.deadline = now + task.timeout if task.timeout is not None else None
        self.reason: StopReason | None = None
        self.kill_at: float | None = None  # SIGKILL for the group and the task's orphans
        self.sigkilled = False
        self.returncode: int | None = None
        self.output: bytes | None = None
        self.output_error: str | None = None

    @property
    def running(self) -> bool:
        return self.returncode is None

    def next_time(self) -> float | None:
        """When `on_time` must run next, on the executor's monotonic clock."""
        if not self.running:
            return None
        if self.reason is None:
            return self.deadline
        return None if self.sigkilled else self.kill_at

    def on_time(self, now: float) -> None:
        if not self.running:
            return
        if self.reason is None and self.deadline is not None and now >= self.deadline:
            self.stop("timeout", now)
        elif self.kill_at is not None and now >= self.kill_at and not self.sigkilled:
            self.sigkilled = True
            killpg(self.pgid, signal.SIGKILL)
            if self.cgroup is not None:
                cgroups.kill(self.cgroup)  # and whatever of the task left the group

    def stop(self, reason: StopReason, now: float) -> None:
        """SIGTERM to the whole group now; `on_time` sends SIGKILL after the grace."""
        if not self.running or self.reason is not None:
            return
        self.reason = reason
        self.kill_at = now + self.grace
        killpg(self.pgid, signal.SIGTERM)

    def reap(self, now: float) -> bool:
        """Collect the main process after its pidfd turned readable; False if it had not ended.

        The rest of the group gets SIGTERM first, while the unreaped zombie still holds the
        pgid (so the id cannot name someone else's group yet).
        """
        killpg(self.pgid, signal.SIGTERM)
        returncode = self.popen.poll()
        if returncode is None:
            return False
        self.returncode = returncode
        if self.kill_at is None:
            self.kill_at = now + self.grace
        self.output, self.output_error = read_output(self.task.output_path)
        return True

    def _join_failed(self) -> bool:
        """Whether the log ends with the note of the shell that could not join the cgroup."""
        try:
            with open(self.task.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 512))
                return cgroups.JOIN_NOTE.encode() in f.read()
        except OSError:
            return False

    def result(self, orphans_sigkilled: bool) -> Result:
        rc = self.returncode
        assert rc is not None
        exit_code = rc if rc >= 0 else None
        sig = -rc if rc < 0 else None
        if self.reason is not None:
            error: str | None = stop_message(
                self.reason, self.task.timeout, self.grace, self.sigkilled or orphans_sigkilled
            )
        elif rc == cgroups.JOIN_FAILED and self.cgroup is not None and self._join_failed():
            error = f"could not join its cgroup {self.cgroup}, so it did not run (see its log)"
        elif rc != 0:
            error = describe_end(rc)
        else:
            error = self.output_error
        return Result(
            key=self.key,
            exit_code=exit_code,
            signal=sig,
            error=error,
            output=self.output,
            timed_out=self.reason == "timeout",
            cancelled=self.reason == "cancel",
        )


def spawn(
    task: Task,
    *,
    stdin: int,
    now: float,
    grace: float,
    log_limit: int = DEFAULT_LOG_LIMIT,
    cgroup: Path | None = None,
) -> RunProcess:
    """Start `task` in its own process group (and in `cgroup`, which it joins before its
    command runs: chute.execution.cgroups), pinned to `task.cores`, its output into a LogPipe;
    SpawnError says why not."""
    assert task.command is not None, f"run: task {task.key} has no command"
    cmd = task.command
    env = dict(task.env)
    env[procfs.TASK_KEY_VAR] = task.key
    if cgroup is None:
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    else:
        if not isinstance(cmd, str):
            _check_program(cmd[0], env.get("PATH", os.defpath), task.cwd)
        argv = cgroups.join_argv(cgroup, cmd, env.get("PWD"))
    make_folders(task)
    out = LogPipe(task.key, task.log_path, log_limit)
    try:
        # Affinity is per thread on Linux and a child inherits its parent thread's mask at
        # fork, so pinning this thread around the spawn pins the task and everything it
        # starts, without a preexec_fn (which would force fork instead of vfork).
        saved = os.sched_getaffinity(0) if task.cores else None
        if saved is not None and saved == set(task.cores):
            saved = None  # already there: spare the two system calls
        if saved is not None:
            try:
                os.sched_setaffinity(0, task.cores)
            except OSError as exc:
                raise SpawnError(
                    f"cannot pin to cores {','.join(map(str, task.cores))}: {exc.strerror}"
                ) from None
        try:
            popen = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=out.write_fd,
                stderr=out.write_fd,
                env=env,
                cwd=task.cwd,
                process_group=0,
            )
        except OSError as exc:
            if task.cwd is not None and exc.filename == task.cwd:
                raise SpawnError(f"cannot change to cwd {task.cwd}: {exc.strerror}") from None
            if exc.errno == errno.E2BIG:
                raise SpawnError(too_big_to_exec(argv, env)) from None
            raise _cannot_start(argv[0], exc.errno or errno.ENOENT, env) from None
        finally:
            if saved is not None:
                os.sched_setaffinity(0, saved)
    except BaseException:
        out.close()
        raise
    out.child_started()
    try:
        return RunProcess(task, popen, out, now, grace, cgroup)
    except OSError:
        popen.kill()
        popen.wait()
        out.close()
        raise


def _cannot_start(program: str, errno_: int, env: dict[str, str]) -> SpawnError:
    return SpawnError(f"cannot start {program}: {os.strerror(errno_)} (PATH={env.get('PATH', '')})")


def _check_program(program: str, path: str, cwd: str | None) -> None:
    """SpawnError, as Popen would give it, for an argv program that cannot be run: behind the
    shell that joins the cgroup, the exec fails only in the child."""
    if "/" in program:
        where = os.path.join(cwd or ".", program)
        if not os.path.exists(where):
            raise _cannot_start(program, errno.ENOENT, {"PATH": path})
        if not os.access(where, os.X_OK):
            raise _cannot_start(program, errno.EACCES, {"PATH": path})
    else:
        dirs = [os.path.join(cwd or ".", d) for d in path.split(os.pathsep)]
        if shutil.which(program, path=os.pathsep.join(dirs)) is None:
            raise _cannot_start(program, errno.ENOENT, {"PATH": path})
