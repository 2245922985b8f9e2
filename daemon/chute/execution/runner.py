"""Starting one `run:` task: its folders, its log, and its main process, pinned, in its groups.

Owns: one task's folders (Task.folders) and its log file as a task's file (open_log), its
main process (a Popen in its own process group, and in its own cgroup when it has one: a
shell joins it before the command runs, chute.execution.cgroups.join_argv), pinned to the
task's cores, and why a task could not start (SpawnError: a missing program or cwd, an
unwritable log, bad cores, a command and environment too big for exec). Not here: the
started task, its deadline, stop escalation and Result (chute.execution.runprocess), its
output pipe and the log cap (chute.execution.logpipe), the threads that call spawn
(chute.execution.spawners), the executor (chute.execution.local), `call:` tasks
(chute.execution.pool, chute.execution.worker).

Crash safety: nothing durable is written here. The log is opened at its end (without
O_APPEND, which splice refuses; the daemon is its only writer while the task runs), so a
retry or a restarted daemon appends to what an earlier attempt wrote.
Diagnostics: a task that cannot start is a Result with an error naming the path and the
errno text (SpawnError.result), so the engine records it like any failed attempt; one
whose filesystem is out of room or read-only is lost, not failed. A task's folder is
hostile input: its log is opened through chute.store.taskfiles (a FIFO, folder or link a
task put there fails the attempt with a reason that says what is there; nothing blocks).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

from chute.execution import cgroups, procfs
from chute.execution.executor import Result, Task
from chute.execution.logpipe import DEFAULT_LOG_LIMIT, LogPipe
from chute.execution.runprocess import RunProcess
from chute.store import atomic, taskfiles


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


def spawn(
    task: Task,
    *,
    stdin: int,
    mono: float,
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
    log_fd = open_log(task.log_path)
    try:
        out = LogPipe(task.key, task.log_path, log_limit, log_fd)
    except OSError as exc:
        os.close(log_fd)
        raise SpawnError(
            f"cannot make the output pipe for {task.log_path}: {exc.strerror}"
        ) from None
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
        return RunProcess(task, popen, out, mono, grace, cgroup)
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
