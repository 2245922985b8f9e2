"""`call:` tasks: a pool of long-lived worker processes, one task per worker at a time.

Owns: the worker processes (from a forkserver), their pipes, the queue of call tasks waiting
for a worker, each call's deadline and SIGTERM → grace → SIGKILL escalation. Not here: what
runs inside a worker around one call (chute.execution.worker), the loop (chute.reactor,
which chute.execution.local hands this module), `run:` tasks (chute.execution.runner).

Data flow (one duplex pipe per worker, so the pool always knows which task a worker runs):

    Pool.start ─► queue ─► idle worker ──send(task, grace, log_limit)──► worker.main: run_call
    Pool.on_reply ◄──recv((exit_code, error, output, no_room, done-mark, hash))──┘
    worker sentinel readable ─► that worker's task fails alone; a new worker on demand

Why not ProcessPoolExecutor: when one of its workers dies, every pending future fails with
BrokenProcessPool and nothing says which task killed the worker.
Crash safety: nothing durable is written here. A call must not go on after a crash of the
daemon while the resumed run starts it again: a worker dies with its parent, the
forkserver, which ends when the daemon does (PR_SET_PDEATHSIG), joins its owner's pool
cgroup before it runs anything (chute.execution.worker), and is recorded by its owner as it
starts (chute.execution.leftovers ends both after a crash).
Diagnostics: a worker that dies fails its own task alone, with how it ended (one WARNING);
one that cannot be started fails the task it was for (one ERROR).
Limits: timeouts of queued calls count from when a worker takes them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable
from multiprocessing import forkserver, resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from chute.clock import Clock
from chute.execution import worker
from chute.execution.executor import Result, Task
from chute.execution.logpipe import DEFAULT_LOG_LIMIT
from chute.execution.runner import SpawnError
from chute.execution.runprocess import StopReason, describe_end, kill, stop_message
from chute.reactor import Reactor

log = logging.getLogger(__name__)


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
        reactor: Reactor,
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
        self._reactor = reactor
        self._emit = emit
        self._queue: deque[Task] = deque()
        self._workers: dict[int, _Worker] = {}  # by pid
        self._idle: list[_Worker] = []  # most recently used last
        # forkserver, not fork: the daemon has threads (HTTP, intake, scheduler), and a
        # fork of a threaded process may copy a lock some other thread held, for ever.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["chute.execution.worker"])

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

    def on_time(self, mono: float) -> None:
        for w in list(self._workers.values()):
            if w.task is not None and w.reason is None and w.deadline is not None:
                if mono >= w.deadline:
                    self._stop(w, "timeout", mono)
            elif (
                w.reason is not None
                and not w.sigkilled
                and w.kill_at is not None
                and (mono >= w.kill_at)
            ):
                w.sigkilled = True
                kill(w.pid, signal.SIGKILL)
        while self._idle and mono >= self._idle[0].idle_since + self._idle_timeout:
            self._retire(self._idle.pop(0))

    def _stop(self, w: _Worker, reason: StopReason, mono: float) -> None:
        if w.reason is not None:
            return
        w.reason = reason
        w.kill_at = mono + self._grace
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
            mono = self._clock.monotonic()
            w.deadline = mono + task.timeout if task.timeout is not None else None

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
            target=worker.main, args=(child_end, cgroup), name="chute-worker", daemon=True
        )
        process.start()
        child_end.close()
        w = _Worker(process, parent_end)
        if self._on_worker is not None:
            self._on_worker(w.pid)
        self._workers[w.pid] = w
        self._reactor.register(parent_end, lambda: self._on_reply(w))
        self._reactor.register(w.sentinel, lambda: self._on_exit(w))
        log.debug("worker pid=%d started", w.pid)
        return w

    def _close_conn(self, w: _Worker) -> None:
        if w.conn is not None:
            self._reactor.unregister(w.conn)
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
        self._reactor.unregister(w.sentinel)
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
            self._reactor.unregister(w.sentinel)
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
