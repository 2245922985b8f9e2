"""What runs inside a `call:` worker process: one call at a time, in the task's surroundings.

Owns: a worker's life (it dies with the forkserver, joins its owner's pool cgroup, then
serves one (task, grace, log_limit) after another until its pipe closes) and what runs
around one call: its folders, affinity, log redirection and its cap, environment,
sys.path, cwd, the import, the call, the JSON check, the done-mark, and ending what the
call left running. Not here: the workers seen from the daemon, their queue, deadlines and
escalation (chute.execution.pool).

Crash safety: a succeeded call's done-mark (Task.mark) is put in place here, atomically but
not synced (the engine's group commit syncs it); a call's log is appended to (O_APPEND),
opened as a task's file (chute.store.taskfiles: a FIFO or link there fails the call, never
blocks the worker). A call's own subprocesses carry the task cookie (CHUTE_TASK_KEY is in
os.environ during the call), so they are ended after a crash too.
Diagnostics: the user's mistakes (import errors, exceptions, bad return values) are the
Result's one-line error, with tracebacks in the task's log, never in the daemon's.
A chute bug inside the worker is a Result error starting `chute worker error:` and a
traceback in the task's log.
Limits: modules imported from the task's cwd or PYTHONPATH stay cached in the worker only
while the next call has the same code paths and none of their files changed (another
pipeline may have a module of the same name; a user may have fixed theirs); module-level
state of the user's code survives between calls of the same pipeline, as in any pool.
A call that changes process-wide state other than the environment, cwd, sys.path,
affinity and fds 1/2 (signal handlers, threads) leaves it for the next call.
The log cap (`log_limit`, as for run: tasks) is applied after the call: a call writes
straight to its log file (fds 1 and 2 are the file, so C extensions and subprocesses write
there too, with no pipe to meter), and a log found over the limit is cut back to it and gets
the same note as a capped run: task. During the call a log can overshoot by whatever the call
prints: a `print` storm of a gigabyte inside one call takes that much disk until the call
ends (and stays, if the worker is killed: a stopped or dead worker's call is not cut).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import inspect
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import psutil

from chute.execution import procfs
from chute.execution.executor import MAX_OUTPUT_BYTES, OUTPUT_TOO_BIG, Mark, Task
from chute.execution.logpipe import DEFAULT_LOG_LIMIT, cap_note
from chute.execution.runner import SpawnError, make_folders, open_log
from chute.store import atomic, outputs, taskfiles

Reply = tuple[int, str | None, bytes | None]  # exit_code, error, output
# What a worker sends back: a Reply, then the errno of a call that could not start for
# want of room (SpawnError.no_room), the done-mark it put in place and its data's hash.
Message = tuple[int, str | None, bytes | None, int | None, bytes | None, str | None]


def main(conn: Connection, cgroup: str | None = None) -> None:
    """A worker's loop: one (task, grace, log_limit) in, one Reply out, until the pipe closes.

    First the worker dies with its parent, the forkserver, which ends when the daemon does
    (a call must not go on after a crash while the resumed run starts it again), and joins
    its owner's pool cgroup, before anything it runs can fork."""
    _die_with_parent()
    refused = _join(cgroup)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task, grace, log_limit = message
        out: Message
        if refused is not None:  # never unfenced: each call fails, saying why
            conn.send((1, refused, None, None, None, None))
            continue
        try:
            exit_code, error, output = run_call(task, grace, log_limit)
            done = output_hash = None
            if exit_code == 0 and error is None and task.mark is not None:
                error, done, output_hash = leave_mark(task.mark, output)
            out = (exit_code, error, output, None, done, output_hash)
        except SpawnError as exc:
            out = (1, str(exc), None, exc.no_room, None, None)
        except Exception as exc:  # noqa: BLE001 - a chute bug: say so in the Result, keep serving
            traceback.print_exc()
            out = (1, f"chute worker error: {type(exc).__name__}: {exc}", None, None, None, None)
        conn.send(out)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # prctl fails only for a bad signal number (EINVAL): nothing to report.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The forkserver ends when its liveness pipe reads EOF, and every child it forks gets
    # the pipe's write end (so that it could use the forkserver in turn): while a worker
    # holds it, the forkserver outlives a killed daemon, and so does the worker. A worker
    # gives it up; a call that uses a forkserver of its own starts a new one.
    server: Any = forkserver._forkserver  # private, the same from 3.4 to 3.13
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
        server._forkserver_address = None
        server._forkserver_pid = None


def _join(cgroup: str | None) -> str | None:
    """Move this worker into `cgroup`; None when done (or there is none), else why not."""
    if cgroup is None:
        return None
    try:
        fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError as exc:
        return (
            f"the worker could not join its cgroup {cgroup} ({exc.strerror}), "
            "so the call did not run"
        )
    return None


def leave_mark(mark: Mark, output: bytes | None) -> tuple[str | None, bytes | None, str | None]:
    """Write a succeeded call's done-mark: (error, the output.json, its data's hash).

    The error is why the artifacts fail the call (one linking out of the run, a FIFO, a
    folder that cannot be listed: as the engine would fail a run: task). The mark is left to
    the engine (None) when it cannot be written here: the engine's writes know how to wait
    for a full disk, and what a path a task replaced means for the attempt.
    """
    folder = Path(mark.path).parent
    listing, escape = outputs.scan_artifacts(folder / "artifacts", folder, Path(mark.run_dir))
    if escape is not None:
        return escape, None, None
    data = orjson.loads(output) if output else None
    output_hash = outputs.data_hash(data)
    blob = outputs.document(
        stage=mark.stage,
        version=mark.version,
        created_at=time.time(),
        started_at=mark.started_at,
        input_hash=mark.input_hash,
        data=data,
        artifacts=listing,
        output_hash=output_hash,
    )
    try:
        atomic.write_volatile(Path(mark.path), blob)
    except OSError:
        return None, None, None
    return None, blob, output_hash


_home: set[int] = set()  # the worker's CPUs when it started: a call without cores runs there


def _pin(cores: tuple[int, ...]) -> None:
    """Move this worker to the call's cores (a call without cores: to all of its own) and
    leave it there afterwards; the next call moves it only if its cores differ, so a worker
    that serves one core set pays no system call per call."""
    if not _home:
        _home.update(os.sched_getaffinity(0))
    want = set(cores) if cores else _home
    if os.sched_getaffinity(0) != want:
        os.sched_setaffinity(0, want)


@contextlib.contextmanager
def _output_to(fd: int) -> Iterator[None]:
    """fds 1 and 2, sys.stdout/err and a root logging handler all append to the log `fd`
    (taken over: closed here)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = (os.dup(1), os.dup(2))
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        root.removeHandler(handler)
        root.setLevel(level)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Modules imported from a task's cwd or PYTHONPATH: name → (file, mtime). They stay cached
# while the next call has the same code paths and no such file changed; otherwise they are
# dropped, so another pipeline's `etl` or an edited module is imported afresh.
_user_modules: dict[str, tuple[str, float]] = {}
_user_paths: list[str] = []


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


@contextlib.contextmanager
def _code_paths(cwd: str | None, pythonpath: str | None) -> Iterator[list[str]]:
    """cwd and PYTHONPATH first on sys.path, chdir to cwd (both undone after the call)."""
    paths = [p for p in [cwd, *(pythonpath or "").split(os.pathsep)] if p]
    stale = paths != _user_paths or any(
        _mtime(file) != mtime for file, mtime in _user_modules.values()
    )
    if stale:
        for name in _user_modules:
            sys.modules.pop(name, None)
        _user_modules.clear()
        _user_paths[:] = paths
        importlib.invalidate_caches()
    saved_path = list(sys.path)
    saved_cwd = os.getcwd()
    before = set(sys.modules)
    sys.path[:0] = paths
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield paths
    finally:
        sys.path[:] = saved_path
        os.chdir(saved_cwd)
        roots = tuple(os.path.join(os.path.abspath(p), "") for p in paths)
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith(roots):
                _user_modules[name] = (file, _mtime(file))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _import(module: str) -> tuple[Any, str | None]:
    """The module, or the one-line error; uvicorn's distinction between the module missing
    and the module failing inside (a missing dependency of it is the user's bug, not ours)."""
    try:
        return importlib.import_module(module), None
    except ModuleNotFoundError as exc:
        parts = module.split(".")
        asked = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if exc.name in asked:
            head = ", ".join(repr(p) for p in sys.path[:3])
            return None, (
                f"cannot import {module!r}: no module named {exc.name!r} "
                f"(sys.path starts with {head})"
            )
        traceback.print_exc()
        return None, f"importing {module!r} failed: {_first_line(exc)}"
    except BaseException as exc:  # noqa: BLE001 - the user's module may raise anything
        traceback.print_exc()
        return None, f"importing {module!r} failed: {_first_line(exc)}"


def _end_children(grace: float) -> None:
    """End what the call started and left running: nothing outlives its task."""
    if not procfs.children(os.getpid()):  # the cheap check, for the usual case
        return
    kids = psutil.Process().children(recursive=True)
    for p in kids:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(kids, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def cap_log(path: str, limit: int) -> None:
    """Cut the log at `path` back to `limit` bytes plus the cap note, if it is longer.

    Best effort: a log we cannot open or cut is left as it is (the call's result stands);
    one a task replaced by a FIFO or a link is not touched (chute.store.taskfiles).
    """
    try:
        fd = taskfiles.open_regular(path, os.O_WRONLY)
    except OSError:
        return
    try:
        if os.fstat(fd).st_size > limit:
            os.ftruncate(fd, limit)
            os.pwrite(fd, cap_note(limit), limit)
    except OSError:
        pass
    finally:
        os.close(fd)


def run_call(task: Task, grace: float, log_limit: int = DEFAULT_LOG_LIMIT) -> Reply:
    """Run one call: task in this (worker) process and return its Reply; SpawnError when
    its folders or log cannot be made."""
    try:
        return _run_call(task, grace)
    finally:
        cap_log(task.log_path, log_limit)


def _run_call(task: Task, grace: float) -> Reply:
    module_name, _, fn_name = (task.call or "").partition(":")
    if not module_name or not fn_name:
        return 1, f"call {task.call!r} is not 'module:function'", None
    env = dict(task.env)
    env[procfs.TASK_KEY_VAR] = task.key
    with contextlib.ExitStack() as stack:
        make_folders(task)
        stack.enter_context(_output_to(open_log(task.log_path, append=True)))
        _pin(task.cores)
        stack.enter_context(_environment(env))
        stack.enter_context(_code_paths(task.cwd, env.get("PYTHONPATH")))
        try:
            return _call(task, module_name, fn_name)
        finally:
            _end_children(grace)
    raise AssertionError("unreachable")


def _call(task: Task, module_name: str, fn_name: str) -> Reply:
    module, error = _import(module_name)
    if error is not None:
        return 1, error, None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        return 1, f"module {module_name!r} has no function {fn_name!r}", None
    kwargs = dict(task.kwargs)
    try:
        takes_ctx = "ctx" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_ctx = False
    if takes_ctx:
        kwargs["ctx"] = task.context
    try:
        value = fn(**kwargs)
    except BaseException as exc:  # noqa: BLE001 - any failure of the user's function is its result
        traceback.print_exc()
        return 1, _first_line(exc), None
    if value is None:
        return 0, None, None
    if not isinstance(value, dict):
        return (
            0,
            f"{task.call} returned a {type(value).__name__}; a call: function must return "
            "a dict or None",
            None,
        )
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        return 0, f"{task.call} returned a dict that is not JSON-serializable: {exc}", None
    if len(data) > MAX_OUTPUT_BYTES:
        return 0, OUTPUT_TOO_BIG.format(size=len(data)), None
    return 0, None, data
