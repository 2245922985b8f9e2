"""A started `run:` task: its deadline, its SIGTERM → grace → SIGKILL, its reaping and Result.

Owns: one started task's main process and its pidfd, the task's deadline and its stop
escalation (the SIGKILL to its process group and its cgroup), reaping the main process,
and turning the exit into a Result (CHUTE_OUTPUT read, checked and removed); the wording
of how a process ended and why it was stopped (for call: workers too). Not here: starting
it (chute.execution.runner), its output (chute.execution.logpipe), its orphans
(chute.execution.sweep), the executor that calls on_time and reap (chute.execution.local).

Crash safety: nothing durable is written here; CHUTE_OUTPUT is removed only after it has
been read into the Result.
Diagnostics: a task's own failure (exit code, signal, timeout, bad output) is the Result's
one-line `error`, never a log line of ours. CHUTE_OUTPUT is hostile input: it is read
through chute.store.taskfiles (a FIFO, folder or link there fails the attempt with a reason
that says what is there; nothing blocks).
Limits: the group is signalled only while the main process is an unreaped zombie or alive,
so its pgid cannot have been recycled; processes that left the group are found by the
orphan sweep (chute.execution.sweep), not here. A running task holds three descriptors of
the daemon (pidfd, pipe, log).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Literal

import orjson

from chute.execution import cgroups
from chute.execution.executor import MAX_OUTPUT_BYTES, OUTPUT_TOO_BIG, Result, Task
from chute.execution.logpipe import LogPipe
from chute.store import taskfiles

StopReason = Literal["timeout", "cancel"]


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


def killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


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


class RunProcess:
    """One started `run:` task: its process group, deadline, and (once reaped) its Result."""

    def __init__(
        self,
        task: Task,
        popen: subprocess.Popen[bytes],
        log: LogPipe,
        mono: float,
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
        self.deadline = mono + task.timeout if task.timeout is not None else None
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

    def on_time(self, mono: float) -> None:
        if not self.running:
            return
        if self.reason is None and self.deadline is not None and mono >= self.deadline:
            self.stop("timeout", mono)
        elif self.kill_at is not None and mono >= self.kill_at and not self.sigkilled:
            self.sigkilled = True
            killpg(self.pgid, signal.SIGKILL)
            if self.cgroup is not None:
                cgroups.kill(self.cgroup)  # and whatever of the task left the group

    def stop(self, reason: StopReason, mono: float) -> None:
        """SIGTERM to the whole group now; `on_time` sends SIGKILL after the grace."""
        if not self.running or self.reason is not None:
            return
        self.reason = reason
        self.kill_at = mono + self.grace
        killpg(self.pgid, signal.SIGTERM)

    def reap(self, mono: float) -> bool:
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
            self.kill_at = mono + self.grace
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
