"""`call:` tasks: a pool of long-lived worker processes, one task per worker at a time.

Owns: the worker processes (from a forkserver), their pipes, the queue of call tasks waiting
for a worker, each call's deadline and SIGTERM → grace → SIGKILL escalation, and what runs
inside a worker around one call (its folders, affinity, log redirection and its cap,
environment, sys.path, cwd, import, the call, the JSON check, the done-mark). Not here:
the loop (chute.reactor, which chute.execution.local hands this module), `run:` tasks
(chute.execution.runner).

Data flow (one duplex pipe per worker, so the pool always knows which task a worker runs):

    Pool.start ─► queue ─► idle worker ──send(task, grace, log_limit)──► worker: run_call(...)
    Pool.on_reply ◄──recv((exit_code, error, output, no_room, done-mark, hash))──┘
    worker sentinel readable ─► that worker's task fails alone; a new worker on demand

Why not ProcessPoolExecutor: when one of its workers dies, every pending future fails with
BrokenProcessPool and nothing says which task killed the worker.
Crash safety: a succeeded call's done-mark (Task.mark) is put in place here, atomically but
not synced (the engine's group commit syncs it); a call's log is appended to (O_APPEND),
opened as a task's file (chute.store.taskfiles: a FIFO or link there fails the call, never
blocks the worker).
A call must not go on after a crash of the daemon while the resumed run starts it again:
a worker dies with its parent, the forkserver, which ends when the daemon does
(PR_SET_PDEATHSIG), joins its owner's pool cgroup before it runs anything, and is recorded
by its owner as it starts (chute.execution.owners ends both after a crash); a call's own
subprocesses carry the task cookie (CHUTE_TASK_KEY is in os.environ during the call).
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
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing import forkserver, resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import orjson
import psutil

from chute.clock import Clock
from chute.execution import procfs
from chute.execution.executor import MAX_OUTPUT_BYTES, OUTPUT_TOO_BIG, Mark, Result, Task
from chute.execution.runner import (
    DEFAULT_LOG_LIMIT,
    SpawnError,
    StopReason,
    cap_note,
    describe_end,
    kill,
    make_folders,
    open_log,
    stop_message,
)
from chute.reactor import Reactor
from chute.store import atomic, outputs, taskfiles

log = logging.getLogger(__name__)

Reply = tuple[int, str | None, bytes | None]  # exit_code, error, output
# What a worker sends back: a Reply, then the errno of a call that could not start for
# want of room (SpawnError.no_room), the done-mark it put in place and its data's hash.
Message = tuple[int, str | None, bytes | None, int | None, bytes | None, str | None]

# --- inside a worker ---------------------------------------------------------------------


def _worker_main(conn: Connection, cgroup: str | None = None) -> None:
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
    leave it there afterwards; the next call moves it only if its cores differ. Moving it
    back after every call cost a fifth of a worker's time (measured, 2 cores)."""
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


def _reap_leftovers(grace: float) -> None:
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
            _reap_leftovers(grace)
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


# --- in the daemon -----------------------------------------------------------------------


class _Worker:
    def __init__(self, process: BaseProcess, conn: Connection):
        self.process = process
        self.conn: Connection | None = conn
        self.pid: int = process.pid or 0
        self.sentinel = process.sentinel
        self.task: Task | None = None
        self.cores: tuple[int, ...] = ()  # of its last task: where it runs now
        self.deadline: float | None = None
        self.reason: StopReason | None = None
        self.kill_at: float | None = None
        self.sigkilled = False
        self.idle_since = 0.0
        self.dead = False


def _checked_max_workers(max_workers: int) -> int:
    if max_workers < 1:
        raise ValueError(f"max_workers is {max_workers}; it must be at least 1")
    return max_workers


class Pool:
    """`call:` tasks on up to `max_workers` reusable worker processes.

    Events come from the caller's reactor: each registration is a zero-argument
    callback, which the caller runs when the descriptor turns readable.
    """

    def __init__(
        self,
        *,
        max_workers: int,
        kill_grace: float,
        clock: Clock,
        loop: Reactor,
        emit: Callable[[Result], None],
        max_idle: int | None = None,
        idle_timeout: float = 300.0,
        log_limit: int = DEFAULT_LOG_LIMIT,
        cgroup: Path | None = None,
        on_worker: Callable[[int], None] | None = None,
    ):
        """`cgroup`: the group every worker joins (chute.execution.cgroups); `on_worker(pid)` is
        called as each worker starts (the owner records it: chute.execution.owners)."""
        self._max_workers = _checked_max_workers(max_workers)
        self._cgroup = cgroup
        self._on_worker = on_worker
        self._idle_cap = max_idle  # None: as many as max_workers
        self._idle_timeout = idle_timeout
        self._grace = kill_grace
        self._log_limit = log_limit
        self._clock = clock
        self._loop = loop
        self._emit = emit
        self._queue: deque[Task] = deque()
        self._workers: dict[int, _Worker] = {}  # by pid
        self._idle: list[_Worker] = []  # most recently used last
        # forkserver, not fork: the daemon has threads (HTTP, intake, scheduler), and a
        # fork of a threaded process may copy a lock some other thread held, for ever.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["chute.execution.pool"])

    @property
    def _max_idle(self) -> int:
        """Idle workers kept: `max_idle`, never more than the pool's size."""
        cap = self._idle_cap
        return self._max_workers if cap is None else min(cap, self._max_workers)

    def live_keys(self) -> set[str]:
        keys = {t.key for t in self._queue}
        keys.update(w.task.key for w in self._workers.values() if w.task is not None)
        return keys

    def worker_pids(self) -> set[int]:
        return set(self._workers)

    def start(self, task: Task) -> None:
        self._queue.append(task)
        self._dispatch()

    def cancel(self, key: str) -> None:
        for task in self._queue:
            if task.key == key:
                self._queue.remove(task)
                self._emit(Result.not_started(key))
                return
        for w in self._workers.values():
            if w.task is not None and w.task.key == key:
                self._stop(w, "cancel", self._clock.monotonic())
                return

    def next_time(self) -> float | None:
        times: list[float] = []
        for w in self._workers.values():
            if w.task is not None and w.reason is None and w.deadline is not None:
                times.append(w.deadline)
            elif w.reason is not None and not w.sigkilled and w.kill_at is not None:
                times.append(w.kill_at)
        if self._idle and self._idle_timeout:
            times.append(self._idle[0].idle_since + self._idle_timeout)
        return min(times) if times else None

    def on_time(self, now: float) -> None:
        for w in list(self._workers.values()):
            if w.task is not None and w.reason is None and w.deadline is not None:
                if now >= w.deadline:
                    self._stop(w, "timeout", now)
            elif (
                w.reason is not None
                and not w.sigkilled
                and w.kill_at is not None
                and (now >= w.kill_at)
            ):
                w.sigkilled = True
                kill(w.pid, signal.SIGKILL)
        while self._idle and now >= self._idle[0].idle_since + self._idle_timeout:
            self._retire(self._idle.pop(0))

    def _stop(self, w: _Worker, reason: StopReason, now: float) -> None:
        if w.reason is not None:
            return
        w.reason = reason
        w.kill_at = now + self._grace
        kill(w.pid, signal.SIGTERM)

    def _dispatch(self) -> None:
        while self._queue:
            if self._idle:
                w = self._idle_worker(self._queue[0].cores)
            elif len(self._workers) < self._max_workers:
                try:
                    w = self._new_worker()
                except OSError as exc:
                    task = self._queue.popleft()
                    log.error("cannot start a worker process for %s: %s", task.key, exc)
                    error = f"cannot start a worker process: {exc.strerror or exc}"
                    self._emit(Result(key=task.key, error=error, lost=True))
                    continue
            else:
                return
            task = self._queue.popleft()
            assert w.conn is not None
            try:
                w.conn.send((task, self._grace, self._log_limit))
            except (BrokenPipeError, ConnectionResetError):
                # died while idle: not this task's fault; its sentinel event forgets it
                self._queue.appendleft(task)
                self._close_conn(w)
                continue
            w.task = task
            w.cores = task.cores
            now = self._clock.monotonic()
            w.deadline = now + task.timeout if task.timeout is not None else None

    def _idle_worker(self, cores: tuple[int, ...]) -> _Worker:
        """The idle worker last used on these cores (it need not move), else the most
        recently used one."""
        for i in range(len(self._idle) - 1, -1, -1):
            if self._idle[i].cores == cores:
                return self._idle.pop(i)
        return self._idle.pop()

    def _new_worker(self) -> _Worker:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        cgroup = None if self._cgroup is None else str(self._cgroup)
        process = self._ctx.Process(
            target=_worker_main, args=(child_end, cgroup), name="chute-worker", daemon=True
        )
        process.start()
        child_end.close()
        w = _Worker(process, parent_end)
        if self._on_worker is not None:
            self._on_worker(w.pid)
        self._workers[w.pid] = w
        self._loop.register(parent_end, lambda: self._on_reply(w))
        self._loop.register(w.sentinel, lambda: self._on_exit(w))
        log.debug("worker pid=%d started", w.pid)
        return w

    def _close_conn(self, w: _Worker) -> None:
        if w.conn is not None:
            self._loop.unregister(w.conn)
            w.conn.close()
            w.conn = None

    def _on_reply(self, w: _Worker) -> None:
        assert w.conn is not None
        try:
            exit_code, error, output, no_room, done, output_hash = w.conn.recv()
        except (EOFError, OSError):
            self._close_conn(w)  # the worker is gone; its sentinel tells how
            return
        task = w.task
        if task is None or w.reason is not None:
            return  # a late reply of a task we already stopped: its end comes from _on_exit
        if no_room is not None:
            self._emit(SpawnError(error or "", no_room).result(task.key))
        else:
            self._emit(
                Result(
                    key=task.key,
                    exit_code=exit_code,
                    error=error,
                    output=output,
                    done=done,
                    output_hash=output_hash,
                )
            )
        w.task = None
        w.deadline = None
        if w.dead:
            return
        live = sum(1 for x in self._workers.values() if x.conn is not None)
        if len(self._idle) >= self._max_idle or live > self._max_workers:
            self._retire(w)  # the second: the pool was made smaller while it was busy
        else:
            w.idle_since = self._clock.monotonic()
            self._idle.append(w)
        self._dispatch()

    def _retire(self, w: _Worker) -> None:
        """Closing its pipe ends an idle worker; its sentinel event forgets it."""
        self._close_conn(w)

    def _on_exit(self, w: _Worker) -> None:
        w.dead = True
        if w in self._idle:
            self._idle.remove(w)
        if w.conn is not None and w.task is not None and w.reason is None and w.conn.poll(0):
            self._on_reply(w)  # it answered, then died: the task itself succeeded
        self._close_conn(w)
        self._loop.unregister(w.sentinel)
        w.process.join(5)
        code = w.process.exitcode
        if code is not None:
            w.process.close()
        del self._workers[w.pid]
        task = w.task
        if task is not None:
            how = describe_end(code) if code is not None else "exit status unknown"
            if w.reason is not None:
                error = stop_message(w.reason, task.timeout, self._grace, w.sigkilled)
            else:
                how = how.replace(" (", ", ").rstrip(")")
                error = f"worker process died ({how}) while running stage {task.key}"
                log.warning("worker pid=%d died while running %s: %s", w.pid, task.key, how)
            self._emit(
                Result(
                    key=task.key,
                    exit_code=code if code is not None and code >= 0 else None,
                    signal=-code if code is not None and code < 0 else None,
                    error=error,
                    timed_out=w.reason == "timeout",
                    cancelled=w.reason == "cancel",
                )
            )
        else:
            log.debug("worker pid=%d ended with %s", w.pid, code)
        self._dispatch()

    def configure(self, *, kill_grace: float, log_limit: int, max_workers: int) -> None:
        """New values for the tasks handed to workers from now on (config reload). A smaller
        pool ends its surplus idle workers now and busy ones as their tasks end; a bigger
        one starts what waits for a worker."""
        self._max_workers = _checked_max_workers(max_workers)
        self._grace = kill_grace
        self._log_limit = log_limit
        while len(self._idle) > self._max_idle:
            self._retire(self._idle.pop(0))  # least recently used first
        self._dispatch()

    def close(self, grace: float) -> None:
        """End every worker (busy ones with SIGTERM, then SIGKILL after `grace`)."""
        self._queue.clear()
        for w in self._workers.values():
            if w.task is None:
                self._close_conn(w)
            else:
                w.task = None
                kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for w in self._workers.values():
            w.process.join(max(0.0, deadline - time.monotonic()))
        for w in self._workers.values():
            if w.process.exitcode is None:
                kill(w.pid, signal.SIGKILL)
                w.process.join(5)
            self._close_conn(w)
            self._loop.unregister(w.sentinel)
            if w.process.exitcode is not None:
                w.process.close()
            else:
                log.error("worker pid=%d did not end after SIGKILL", w.pid)
        self._workers.clear()
        self._idle.clear()
        _stop_forkserver()


def _stop_forkserver() -> None:
    """Stop the forkserver and resource tracker multiprocessing started for our workers.

    They are children of the daemon and would outlive close(); both restart on demand.
    Private API (`_stop`), so looked up defensively.
    """
    for holder, name in ((forkserver, "_forkserver"), (resource_tracker, "_resource_tracker")):
        stop = getattr(getattr(holder, name, None), "_stop", None)
        if callable(stop):
            with contextlib.suppress(Exception):
                stop()
