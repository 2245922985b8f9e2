"""One `run:` task as a process group: spawn it pinned, watch its deadline, end it.

Owns: one task's main process (a Popen in its own process group) and its pidfd, the task's
deadline and its SIGTERM → grace → SIGKILL escalation, and turning the exit into a Result
(CHUTE_OUTPUT read, checked and removed). Also the small /proc readers the orphan sweep
uses (our children, a process's state and group, its CHUTE_TASK_KEY cookie, its tree).
Not here: the selector loop and the orphan sweep (chute.local), `call:` tasks (chute.pool).
Crash safety: nothing durable is written here. The log is opened O_APPEND, so a retry or a
restarted daemon appends to what an earlier attempt wrote; CHUTE_OUTPUT is removed only
after it has been read into the Result.
Diagnostics: a task's own failure (exit code, signal, timeout, bad output) is the Result's
one-line `error`, never a log line of ours. A task that cannot start (missing program,
missing cwd, unwritable log, bad cores) is a Result with an error naming the path and the
errno text, so the engine records it like any failed attempt.
Limits: the group is signalled only while the main process is an unreaped zombie or alive,
so its pgid cannot have been recycled; processes that left the group are found by the
orphan sweep in chute.local, not here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
from dataclasses import dataclass
from typing import Literal

import orjson

from chute.executor import MAX_OUTPUT_BYTES, OUTPUT_TOO_BIG, Result, Task

TASK_KEY_VAR = "CHUTE_TASK_KEY"
"""The cookie every task's environment carries, so the sweep can tell whose orphan it is."""

StopReason = Literal["timeout", "cancel"]


class SpawnError(Exception):
    """The task could not be started; the message is the Result's error."""


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
    """The JSON a task left at CHUTE_OUTPUT (removed once read), or the reason it is unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read CHUTE_OUTPUT {path}: {exc.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"CHUTE_OUTPUT {path} is not a regular file"
        if st.st_size > MAX_OUTPUT_BYTES:
            return None, OUTPUT_TOO_BIG.format(size=st.st_size)
        chunks = []
        total = 0
        while chunk := os.read(fd, MAX_OUTPUT_BYTES + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_OUTPUT_BYTES:  # it grew after fstat: a process still writes
                return None, OUTPUT_TOO_BIG.format(size=total)
        data = b"".join(chunks)
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return None, f"CHUTE_OUTPUT is not valid JSON: {exc}"
        return data, None
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def open_log(path: str) -> int:
    """An O_APPEND descriptor on `path`, creating its folder; SpawnError says why not."""
    try:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise SpawnError(f"cannot open log {exc.filename or path}: {exc.strerror}") from None


class RunProcess:
    """One started `run:` task: its process group, deadline, and (once reaped) its Result."""

    def __init__(self, task: Task, popen: subprocess.Popen[bytes], now: float, grace: float):
        self.task = task
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

    def result(self, orphans_sigkilled: bool) -> Result:
        rc = self.returncode
        assert rc is not None
        exit_code = rc if rc >= 0 else None
        sig = -rc if rc < 0 else None
        if self.reason is not None:
            error: str | None = stop_message(
                self.reason, self.task.timeout, self.grace, self.sigkilled or orphans_sigkilled
            )
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


def spawn(task: Task, *, stdin: int, now: float, grace: float) -> RunProcess:
    """Start `task` in its own process group, pinned to `task.cores`; SpawnError says why not."""
    assert task.command is not None, f"run: task {task.key} has no command"
    cmd = task.command
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    env = dict(task.env)
    env[TASK_KEY_VAR] = task.key
    log_fd = open_log(task.log_path)
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
                stdout=log_fd,
                stderr=log_fd,
                env=env,
                cwd=task.cwd,
                process_group=0,
            )
        except OSError as exc:
            if task.cwd is not None and exc.filename == task.cwd:
                raise SpawnError(f"cannot change to cwd {task.cwd}: {exc.strerror}") from None
            path = env.get("PATH", "")
            raise SpawnError(f"cannot start {argv[0]}: {exc.strerror} (PATH={path})") from None
        finally:
            if saved is not None:
                os.sched_setaffinity(0, saved)
    finally:
        os.close(log_fd)
    try:
        return RunProcess(task, popen, now, grace)
    except OSError:
        popen.kill()
        popen.wait()
        raise


# --- /proc readers for the orphan sweep -------------------------------------------------


HAS_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def children_of(pid: int | str) -> list[int] | None:
    """Direct children of `pid` from /proc/<pid>/task/*/children; None without that file.

    The file needs CONFIG_PROC_CHILDREN; every distribution kernel has it.
    """
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except FileNotFoundError:
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"{base}/{tid}/children", "rb") as f:
                kids.extend(int(p) for p in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            if not HAS_PROC_CHILDREN:
                return None
    return kids


@dataclass(frozen=True, slots=True)
class ProcStat:
    state: str  # R, S, D, Z, ...
    pgid: int


def proc_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcStat(state=fields[0].decode(), pgid=int(fields[2]))


def task_cookie(pid: int) -> str | None:
    """The CHUTE_TASK_KEY in the process's environment as it was at exec, if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    prefix = TASK_KEY_VAR.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def signal_tree(pid: int, sig: int) -> None:
    """`sig` to `pid` and its descendants, parents first (they cannot fork replacements)."""
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        kids = children_of(p) or []
        kill(p, sig)
        todo.extend(kids)
