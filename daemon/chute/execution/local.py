"""The `local` executor: run: tasks as process groups, call: tasks in a worker pool.

Owns: the tasks started on this machine, from start() to their Result: each run: task's
pidfd and output pipe (registered with the caller's reactor, which waits for them), its
deadline and its cgroup, and when to sweep for orphans. Not here: the wait itself (the
reactor: chute.reactor, owned by the daemon or `chute run`), one run: task's spawn, pinning
and kill escalation (chute.execution.runner), the threads that spawn them
(chute.execution.spawners), the orphan sweep (chute.execution.sweep), call: workers
(chute.execution.pool), what a task means to a run (chute.engine).

No process a task started outlives the task (chute.execution.sweep says how). A run: task's
Result is given when its main process is reaped and no orphan of it remains (or at most
DRAIN_LIMIT after its SIGKILL, for a process stuck in the kernel, with an ERROR line),
never later for want of EOF on its output pipe: what the pipe holds then is drained without
blocking and the pipe closed (chute.execution.logpipe caps the log at `log_limit`).
Main processes are reaped by Popen.poll, never waitpid(-1).

Cgroups, when the owner has them (chute.execution.cgroups: a writable cgroup v2 group): each run:
task runs in a group of its own, which it joins before its command runs, and the call:
workers in the owner's pool group. A task's SIGKILL also goes to its whole group
(cgroup.kill), and its Result is given once its group is empty and removed: what is left
in it that the sweep did not see gets SIGKILL then (the Result waits at most DRAIN_LIMIT).
Without cgroups the subreaper and the cookie hold: an escapee can only hide by both
clearing its environment and moving into the daemon's process group, and it still dies at
close(); after a crash, one that cleared its environment and left its group survives.
Crash safety: nothing durable is written here. Each task's process group and each worker
is appended to the owner's record as it starts (chute.execution.owners), and the groups are made
under the owner's recorded group: if the owner dies, its children are reparented to init
(or systemd), and the next daemon start (or `chute gc`) ends them from that record.
Diagnostics: task failures are Results; an orphan that survives SIGKILL is one ERROR line
with its pid; a chute bug raises out of tick().
Limits: start, cancel, tick and close are called from the reactor's thread. One
LocalExecutor per process (a second one would take the first one's tasks for orphans). The
loop's thread must not block signals (the spawner threads it creates inherit its mask,
children inherit theirs, and a task with SIGTERM blocked only dies by SIGKILL), and SIGCHLD
must not be set to SIG_IGN (the kernel would reap our children before we see their status).
Timeouts of queued call: tasks count from when a worker takes them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable

from chute.clock import Clock
from chute.execution import cgroups, runner
from chute.execution.executor import Result, Task
from chute.execution.logpipe import DEFAULT_LOG_LIMIT
from chute.execution.owners import Owner
from chute.execution.pool import Pool
from chute.execution.runprocess import RunProcess, killpg
from chute.execution.spawners import Spawners
from chute.execution.sweep import Orphans
from chute.reactor import Reactor

log = logging.getLogger(__name__)

DRAIN_LIMIT = 5.0  # seconds after SIGKILL we wait for a task's leftovers before giving up
SWEEP_EVERY = 0.1  # seconds between sweeps while only tasks' output wakes the loop


def _checked_log_limit(log_limit: int) -> int:
    if log_limit < 0:
        raise ValueError(f"log_limit is {log_limit}; it must be 0 or more bytes")
    return log_limit


class LocalExecutor:
    """Run and call tasks on this machine; see the module docstring for the fence."""

    def __init__(
        self,
        *,
        reactor: Reactor,
        on_result: Callable[[Result], None],
        kill_grace: float = 10.0,
        max_workers: int,
        clock: Clock | None = None,
        owner: Owner | None = None,
        log_limit: int = DEFAULT_LOG_LIMIT,
    ):
        """`owner`: who starts these tasks (chute.execution.owners): each run: task gets a cgroup of
        its own under the owner's, and the call: workers join its pool group, when the
        owner has one; each task's process group and each worker is recorded as it starts
        (the spawner thread records a task before anything else happens there), so that a
        restart can end what a crashed owner left. A task's log keeps at most `log_limit`
        bytes of its output, then a note that the rest was discarded. Descriptors are
        watched by `reactor`; each task's Result goes to `on_result`, on the reactor's
        thread, from a callback of the reactor or from `tick`."""
        self._log_limit = _checked_log_limit(log_limit)
        self._orphans = Orphans(reactor)  # the daemon becomes the subreaper of its tasks
        self._owner = owner
        self._groups = owner.cgroup if owner is not None else None
        self._grace = kill_grace
        self._clock = clock or Clock()
        self._reactor = reactor
        self._on_result = on_result
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._runs: dict[str, RunProcess] = {}  # started, until their Result is given
        self._leaders: dict[int, RunProcess] = {}  # pid → run, until reaped
        self._pgids: dict[int, str] = {}  # pgid → key, until the Result is given
        self._swept_at = 0.0
        self._leader_ended = False  # a task's leader ended since the last sweep
        self._emptying: set[str] = set()  # ended tasks whose cgroup was killed to empty it
        self._pool = Pool(
            max_workers=max_workers,
            kill_grace=kill_grace,
            clock=self._clock,
            reactor=reactor,
            emit=self._emit,
            log_limit=log_limit,
            cgroup=self._groups.pool if self._groups is not None else None,
            on_worker=owner.record.worker if owner is not None else None,
        )
        # run: tasks are spawned by threads of their own, one per core set.
        self._spawners = Spawners(self._spawn, reactor.post, self._register_spawned)
        self._spawning: dict[str, bool] = {}  # key → cancelled, until registered
        self._closed = False

    # --- the Executor protocol -----------------------------------------------------------

    def start(self, task: Task) -> None:
        key = task.key
        if key in self._runs or key in self._spawning or key in self._pool.live_keys():
            raise ValueError(f"task {key} is already running")
        if task.kind == "call":
            self._pool.start(task)
            return
        self._spawning[key] = False
        self._spawners.put(task)

    def cancel(self, key: str) -> None:
        proc = self._runs.get(key)
        if proc is not None:
            proc.stop("cancel", self._clock.monotonic())
        elif key in self._spawning:
            self._spawning[key] = True  # stopped as soon as it is registered
        else:
            self._pool.cancel(key)

    def tick(self, mono: float) -> float | None:
        """Do what is due at `mono` (deadlines, SIGKILLs after the grace, the orphan sweep)
        and give the Results of tasks whose processes are all gone; returns the seconds
        until the next call is due (None: only a descriptor of ours can change anything).
        Called by the loop after every wait of the reactor."""
        self._on_time(mono)
        real = time.monotonic()  # the sweeps' pace is real time, whatever the clock says
        # Orphans appear when a process of a task ends: sweep (/proc reads) when a leader
        # ended, whose task cannot finish before its orphans are known, and at least every
        # SWEEP_EVERY for the rest; not on every wake-up (a 1 GB writer's output makes
        # thousands, a burst of runs thousands more).
        if self._leader_ended or real >= self._swept_at + SWEEP_EVERY:
            self._leader_ended = False
            self._swept_at = real
            self._sweep(mono, closing=False)
        self._finish_drained(mono)
        due = self._next_time()
        if self._runs or self._orphans or self._pool.live_keys():
            sweep = mono + max(0.0, self._swept_at + SWEEP_EVERY - real)
            due = sweep if due is None else min(due, sweep)
        return None if due is None else max(0.0, due - mono)

    def configure(self, *, kill_grace: float, log_limit: int, max_workers: int) -> None:
        """New `kill_grace` and `log_limit` for tasks started from now on, and a new size
        for the `call:` pool (config reload)."""
        self._log_limit = _checked_log_limit(log_limit)
        self._grace = kill_grace
        self._pool.configure(kill_grace=kill_grace, log_limit=log_limit, max_workers=max_workers)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_spawners()
        for proc in self._runs.values():
            if proc.running:
                killpg(proc.pgid, signal.SIGTERM)
        self._pool.close(self._grace)
        self._orphans.restart()  # SIGTERM now, whoever's it is
        end = time.monotonic() + self._grace
        killed = False
        while True:
            self._closing_step(0.0)
            if not self._leaders and not self._orphans and not self._orphans.strays(self._leaders):
                break
            if time.monotonic() < end:
                self._closing_step(min(end - time.monotonic(), 0.05))
                continue
            if killed:
                for pid in [*self._leaders, *self._orphans]:
                    log.error("process pid=%d did not end after SIGKILL; leaving it", pid)
                break
            killed = True
            end = time.monotonic() + DRAIN_LIMIT
            for proc in self._leaders.values():
                killpg(proc.pgid, signal.SIGKILL)
            self._orphans.kill()
        for proc in self._leaders.values():
            self._reactor.unregister(proc.pidfd)
            os.close(proc.pidfd)
        self._orphans.close()
        for proc in self._runs.values():
            self._end_output(proc)
        if self._groups is not None:
            self._groups.close()  # what is left of the tasks is killed, the groups removed
        os.close(self._devnull)
        self._runs.clear()
        self._leaders.clear()

    def _emit(self, result: Result) -> None:
        if not self._closed:  # close() gives no Results: the caller stops the runs itself
            self._on_result(result)

    def _closing_step(self, wait: float) -> None:
        """In close(): wait up to `wait` seconds for our processes to end, then sweep."""
        self._reactor.wait(max(0.0, wait))
        mono = self._clock.monotonic()
        self._swept_at = time.monotonic()
        self._sweep(mono, closing=True)
        self._finish_drained(mono)

    # --- spawning -----------------------------------------------------------------------

    def _spawn(self, task: Task) -> RunProcess | Result:
        """In a spawner's thread: start `task`, or the Result saying why it could not."""
        group = None
        if self._groups is not None:
            try:
                group = self._groups.task(task.key)
            except OSError as exc:
                error = f"cannot make its cgroup {exc.filename}: {exc.strerror}"
                return Result(key=task.key, error=error)
        try:
            proc = runner.spawn(
                task,
                stdin=self._devnull,
                mono=self._clock.monotonic(),
                grace=self._grace,
                log_limit=self._log_limit,
                cgroup=group,
            )
        except Exception as exc:
            if group is not None:
                with contextlib.suppress(OSError):
                    cgroups.remove(group)
            if isinstance(exc, runner.SpawnError):
                return exc.result(task.key)
            log.exception("spawning task %s failed", task.key)  # a chute bug: the task fails
            return Result(key=task.key, error=f"chute error starting the task: {exc}")
        if self._owner is not None:
            try:
                self._owner.record.task(task.key, proc.pgid)
            except Exception:  # the task runs all the same; only its record is missing
                log.exception("recording the spawn of task %s failed", task.key)
        return proc

    def _register_spawned(self) -> None:
        """Take over what the spawners started: watch its process and its output."""
        while self._spawners.spawned:
            key, outcome = self._spawners.spawned.popleft()
            cancelled = self._spawning.pop(key, False)
            if isinstance(outcome, Result):
                if cancelled:  # it never ran: the cancel is what the caller asked about
                    outcome = Result.not_started(key)
                self._emit(outcome)
                continue
            proc = outcome
            self._runs[key] = proc
            self._leaders[proc.pid] = proc
            self._pgids[proc.pgid] = key
            self._reactor.register(proc.pidfd, functools.partial(self._on_leader, proc))
            self._reactor.register(proc.log.read_fd, functools.partial(self._on_output, proc))
            if cancelled:
                proc.stop("cancel", self._clock.monotonic())

    def _stop_spawners(self) -> None:
        """No further spawns; what the spawners started is registered (close ends it)."""
        self._spawners.stop()
        self._register_spawned()
        self._spawning.clear()

    # --- the loop ----------------------------------------------------------------------

    def _next_time(self) -> float | None:
        times = [t for t in (p.next_time() for p in self._runs.values()) if t is not None]
        orphan_time = self._orphans.next_time()
        if orphan_time is not None:
            times.append(orphan_time)
        for proc in self._runs.values():
            if not proc.running and proc.kill_at is not None:
                times.append(proc.kill_at + DRAIN_LIMIT)
        if self._emptying:
            times.append(self._clock.monotonic() + cgroups.POLL)
        pool_time = self._pool.next_time()
        if pool_time is not None:
            times.append(pool_time)
        return min(times) if times else None

    def _on_time(self, mono: float) -> None:
        for proc in self._runs.values():
            proc.on_time(mono)
        self._orphans.on_time(mono)
        self._pool.on_time(mono)

    def _on_leader(self, proc: RunProcess) -> None:
        if not proc.reap(self._clock.monotonic()):
            return
        self._leader_ended = True
        self._reactor.unregister(proc.pidfd)
        os.close(proc.pidfd)
        del self._leaders[proc.pid]

    def _on_output(self, proc: RunProcess) -> None:
        if not proc.log.pump():  # EOF: every writer closed it (exited, or `exec 1>&- 2>&-`)
            self._unregister_output(proc)
            proc.log.close()

    def _end_output(self, proc: RunProcess) -> None:
        if proc.log.open:
            self._unregister_output(proc)
            proc.log.drain()

    def _unregister_output(self, proc: RunProcess) -> None:
        self._reactor.unregister(proc.log.read_fd)

    def _finish_drained(self, mono: float) -> None:
        for key, proc in list(self._runs.items()):
            if proc.running:
                continue
            # An orphan without a cookie or group to tell whose it is may be this task's:
            # every task that ends meanwhile waits for it too (it dies within the grace).
            if self._orphans.left(key):
                assert proc.kill_at is not None
                if mono < proc.kill_at + DRAIN_LIMIT:
                    continue
                log.error(
                    "task %s ended but %d of its processes survived SIGKILL; giving its result",
                    key,
                    self._orphans.left(key),
                )
            if proc.cgroup is not None and not self._group_removed(proc, mono):
                continue
            del self._runs[key]
            self._pgids.pop(proc.pgid, None)
            self._end_output(proc)
            self._emit(proc.result(self._orphans.sigkilled(key)))

    def _group_removed(self, proc: RunProcess, mono: float) -> bool:
        """Remove an ended task's cgroup: at once when nothing is left in it (the sweep saw
        all of the task's processes end); else what is left, which the sweep could not see,
        gets SIGKILL and the Result waits for it (at most DRAIN_LIMIT)."""
        assert proc.cgroup is not None
        try:  # a plain rmdir, else the tree (a `chute run` started by the task made groups)
            if cgroups.remove(proc.cgroup) or cgroups.remove_tree(proc.cgroup):
                self._emptying.discard(proc.key)
                return True
        except OSError as exc:
            log.error("cannot remove cgroup %s: %s", proc.cgroup, exc.strerror)
            return True
        if proc.cgroup_killed_at is None:
            proc.cgroup_killed_at = mono
            self._emptying.add(proc.key)
            log.debug(
                "task %s ended with processes left in %s; killing them", proc.key, proc.cgroup
            )
            cgroups.kill(proc.cgroup)
            return False
        if mono < proc.cgroup_killed_at + DRAIN_LIMIT:
            return False
        self._emptying.discard(proc.key)
        log.error(
            "task %s ended but its cgroup %s still holds processes after SIGKILL; giving its "
            "result",
            proc.key,
            proc.cgroup,
        )
        return True

    # --- orphans -----------------------------------------------------------------------

    def _sweep(self, mono: float, closing: bool) -> None:
        """Track the orphans of our tasks; SIGTERM to those whose task ended (all, closing)."""
        self._register_spawned()
        self._orphans.sweep(
            closing=closing,
            known=self._leaders.keys() | self._pool.worker_pids(),
            pending=self._spawning,
            task_of_group=self._pgids,
        )
        if not self._orphans:
            return
        live: set[str] = set()
        if not closing:
            live = {k for k, p in self._runs.items() if p.running} | self._pool.live_keys()
        self._orphans.end(mono, live=live, kill_at=self._kill_at, grace=self._grace)

    def _kill_at(self, key: str) -> float | None:
        """When task `key` gets (or got) its SIGKILL, if it is still ours and has one."""
        proc = self._runs.get(key)
        return proc.kill_at if proc is not None and proc.kill_at else None
