"""The `local` executor: run: tasks as process groups, call: tasks in a worker pool, one loop.

Owns: one selector that waits for everything (each run: task's pidfd and output pipe, each
worker's pipe and sentinel, each tracked orphan's pidfd, a wake-up pipe), the deadlines of
all of them, and the orphan sweep. Not here: one run: task's spawn, pinning and kill escalation
(chute.execution.runner), call: workers (chute.execution.pool), what a task means to a run
(chute.engine).

No process a task started outlives the task. A task's main process leads its own process
group; when it ends (any reason) the group gets SIGTERM while the unreaped main process
still holds the pgid. Processes that left the group (`setsid`) are caught because the
daemon is a child subreaper (PR_SET_CHILD_SUBREAPER): every process whose parent dies is
reparented to us, so after a task's main process ends, everything left of the task is in
a tree under one of our direct children that is not a live task. The sweep, each poll,
reads our children (/proc/self/task/*/children: one small read per daemon thread) and,
for each child it does not know, the CHUTE_TASK_KEY cookie every task's environment
carries (as Jenkins' ProcessTreeKiller does with BUILD_ID):
- cookie of a live task: watched (pidfd), ended with its task;
- cookie of an ended task: its tree gets SIGTERM, SIGKILL after the grace, then reaped;
- no cookie (the task cleared its environment) and outside the daemon's own process group:
  also an orphan of a task, since that is the only way such a child can become ours
  (attributed to a task by pgid when it still is in the task's group); ended the same way.
Other children the daemon starts itself (multiprocessing's forkserver and resource tracker,
helpers of other modules) stay in the daemon's process group and keep their environment
without a cookie, so the sweep leaves them alone: daemon code must not start children in a
new process group or session except through this executor.
A run: task's Result is given when its main process is reaped and no orphan of it remains
(or at most 5 s after its SIGKILL, for a process stuck in the kernel, with an ERROR line),
never later for want of EOF on its output pipe: what the pipe holds then is drained without
blocking and the pipe closed (chute.execution.runner.LogPipe caps the log at `log_limit`).
Reaping is by pid only (Popen.poll for main processes, waitpid(pid) for orphans), never
waitpid(-1), which would steal the children of Popen and multiprocessing.

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
with its pid; a chute bug raises out of poll().
Spawning: run: tasks are started by spawner threads, one per core set and pinned to it
(_Spawner), so neither the wait for a child's exec nor the pinning is the loop's; what
they started is registered by the loop (a pidfd and the output pipe in the selector)
before the next sweep looks at our children.
Limits: start, cancel, poll and close are called from one thread (the loop); wake from any
thread or a signal handler. One LocalExecutor per process (a second one would take the
first one's tasks for orphans). The loop's thread must not block signals (the spawner
threads it creates inherit its mask, children inherit theirs, and a task with SIGTERM
blocked only dies by SIGKILL), and SIGCHLD must not be set to SIG_IGN (the kernel would
reap our children before we see their status).
Timeouts of queued call: tasks count from when a worker takes them. A double-forked
process of a call: task (reparented to us, in the daemon's process group) that exits
before a sweep sees it stays a zombie: the sweep does not reap in the daemon's group.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from chute.clock import Clock
from chute.execution import cgroups, procfs, runner
from chute.execution.executor import Result, Task
from chute.execution.owners import Owner
from chute.execution.pool import Pool
from chute.execution.runner import RunProcess
from chute.reactor import Reactor
from chute.scheduling.topology import format_cpulist

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
DRAIN_LIMIT = 5.0  # seconds after SIGKILL we wait for a task's leftovers before giving up
SWEEP_EVERY = 0.1  # seconds between sweeps while only tasks' output wakes the loop
MAX_SPAWNERS = 128  # spawner threads kept (one per core set); the least recently used goes

_subreaper_done = False


def _checked_log_limit(log_limit: int) -> int:
    if log_limit < 0:
        raise ValueError(f"log_limit is {log_limit}; it must be 0 or more bytes")
    return log_limit


def become_subreaper() -> None:
    """Orphans of our tasks are reparented to this process instead of init (once)."""
    global _subreaper_done
    if _subreaper_done:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
    _subreaper_done = True


class _Spawner:
    """A thread that starts the run: tasks of one core set, pinned to those cores for life.

    Off the loop, because a spawn waits for the child's exec (vfork), and pinning the
    loop's own thread around it moved the loop to the task's core and back: together
    ~35% of the loop in a burst of runs, during which it can now record results and
    take files (the GIL is free while a spawn waits). A thread per core set, because a
    child inherits its parent thread's affinity: started from a thread already there,
    a task is pinned without any move (chute.execution.runner.spawn skips the system calls).
    """

    def __init__(
        self,
        cores: tuple[int, ...],
        spawn: Callable[[Task], RunProcess | Result],
        out: deque[tuple[str, RunProcess | Result]],
        post: Callable[[Callable[[], None]], None],
        register: Callable[[], None],
    ):
        self._cores = cores
        self._spawn = spawn
        self._out = out
        self._post = post
        self._register = register
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        name = f"chute-spawn-{format_cpulist(cores) if cores else 'any'}"
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, task: Task) -> None:
        self._queue.put(task)

    def retire(self) -> None:
        """Start what is queued, then end (without waiting here)."""
        self._queue.put(None)

    def stop(self) -> None:
        """Start nothing more of what is queued; return once the thread is gone."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._queue.put(None)
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        if self._cores:
            with contextlib.suppress(OSError):  # a bad core set fails in each spawn instead
                os.sched_setaffinity(0, self._cores)
        while (task := self._queue.get()) is not None:
            self._out.append((task.key, self._spawn(task)))
            self._post(self._register)  # the loop's thread takes it over


@dataclass(slots=True)
class _Orphan:
    pid: int
    pidfd: int
    owner: str | None  # the task key it belongs to, when known
    kill_at: float | None = None  # set once it got SIGTERM
    killed: bool = False


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
        log_limit: int = runner.DEFAULT_LOG_LIMIT,
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
        become_subreaper()
        self._owner = owner
        self._groups = owner.cgroup if owner is not None else None
        self._grace = kill_grace
        self._clock = clock or Clock()
        self._reactor = reactor
        self._on_result = on_result
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._daemon_pgid = os.getpgid(0)
        self._runs: dict[str, RunProcess] = {}  # started, until their Result is given
        self._leaders: dict[int, RunProcess] = {}  # pid → run, until reaped
        self._pgids: dict[int, str] = {}  # pgid → key, until the Result is given
        self._orphans: dict[int, _Orphan] = {}
        self._orphans_of: dict[str | None, int] = {}  # owner key → tracked orphans
        self._orphans_sigkilled: set[str] = set()
        self._spared: set[int] = set()  # our children that are not tasks' (forkserver, …)
        self._swept_at = 0.0
        self._leader_ended = False  # a task's leader ended since the last sweep
        self._emptying: set[str] = set()  # ended tasks whose cgroup was killed to empty it
        self._pool = Pool(
            max_workers=max_workers,
            kill_grace=kill_grace,
            clock=self._clock,
            loop=reactor,
            emit=self._emit,
            log_limit=log_limit,
            cgroup=self._groups.pool if self._groups is not None else None,
            on_worker=owner.record.worker if owner is not None else None,
        )
        # run: tasks are spawned by threads of their own, one per core set (see _Spawner).
        self._spawners: dict[tuple[int, ...], _Spawner] = {}  # least recently used first
        self._retired: list[_Spawner] = []  # dropped from _spawners, maybe still starting
        self._spawning: dict[str, bool] = {}  # key → cancelled, until registered
        self._spawned: deque[tuple[str, RunProcess | Result]] = deque()
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
        self._spawner(task.cores).put(task)

    def cancel(self, key: str) -> None:
        proc = self._runs.get(key)
        if proc is not None:
            proc.stop("cancel", self._clock.monotonic())
        elif key in self._spawning:
            self._spawning[key] = True  # stopped as soon as it is registered
        else:
            self._pool.cancel(key)

    def tick(self, now: float) -> float | None:
        """Do what is due at `now` (deadlines, SIGKILLs after the grace, the orphan sweep)
        and give the Results of tasks whose processes are all gone; returns the seconds
        until the next call is due (None: only a descriptor of ours can change anything).
        Called by the loop after every wait of the reactor."""
        self._on_time(now)
        wall = time.monotonic()
        # Orphans appear when a process of a task ends: sweep (/proc reads) when a leader
        # ended, whose task cannot finish before its orphans are known, and at least every
        # SWEEP_EVERY for the rest; not on every wake-up (a 1 GB writer's output makes
        # thousands, a burst of runs thousands more).
        if self._leader_ended or wall >= self._swept_at + SWEEP_EVERY:
            self._leader_ended = False
            self._swept_at = wall
            self._sweep(now, closing=False)
        self._finish_drained(now)
        due = self._next_time()
        if self._runs or self._orphans or self._pool.live_keys():
            sweep = now + max(0.0, self._swept_at + SWEEP_EVERY - wall)
            due = sweep if due is None else min(due, sweep)
        return None if due is None else max(0.0, due - now)

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
                runner.killpg(proc.pgid, signal.SIGTERM)
        self._pool.close(self._grace)
        for o in self._orphans.values():
            o.kill_at = None  # SIGTERM now, whoever's it is
        end = time.monotonic() + self._grace
        killed = False
        while True:
            self._closing_step(0.0)
            if not self._leaders and not self._orphans and not self._stray_children():
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
                runner.killpg(proc.pgid, signal.SIGKILL)
            for o in self._orphans.values():
                runner.signal_tree(o.pid, signal.SIGKILL)
        for proc in self._leaders.values():
            self._reactor.unregister(proc.pidfd)
            os.close(proc.pidfd)
        for o in self._orphans.values():
            self._reactor.unregister(o.pidfd)
            os.close(o.pidfd)
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
        now = self._clock.monotonic()
        self._swept_at = time.monotonic()
        self._sweep(now, closing=True)
        self._finish_drained(now)

    # --- spawning -----------------------------------------------------------------------

    def _spawner(self, cores: tuple[int, ...]) -> _Spawner:
        spawner = self._spawners.pop(cores, None)
        if spawner is None:
            if len(self._spawners) >= MAX_SPAWNERS:
                # Its queue may still hold tasks: it starts them, then ends.
                oldest = self._spawners.pop(next(iter(self._spawners)))
                oldest.retire()
                self._retired = [s for s in self._retired if s.alive] + [oldest]
            spawner = _Spawner(
                cores, self._spawn, self._spawned, self._reactor.post, self._register_spawned
            )
        self._spawners[cores] = spawner  # now the most recently used
        return spawner

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
                now=self._clock.monotonic(),
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
        while self._spawned:
            key, outcome = self._spawned.popleft()
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
        for spawner in [*self._spawners.values(), *self._retired]:
            spawner.stop()
        self._spawners.clear()
        self._retired.clear()
        self._register_spawned()
        self._spawning.clear()

    # --- the loop ----------------------------------------------------------------------

    def _next_time(self) -> float | None:
        times = [t for t in (p.next_time() for p in self._runs.values()) if t is not None]
        times.extend(o.kill_at for o in self._orphans.values() if o.kill_at and not o.killed)
        for proc in self._runs.values():
            if not proc.running and proc.kill_at is not None:
                times.append(proc.kill_at + DRAIN_LIMIT)
        if self._emptying:
            times.append(self._clock.monotonic() + cgroups.POLL)
        pool_time = self._pool.next_time()
        if pool_time is not None:
            times.append(pool_time)
        return min(times) if times else None

    def _on_time(self, now: float) -> None:
        for proc in self._runs.values():
            proc.on_time(now)
        for o in self._orphans.values():
            if o.kill_at is not None and not o.killed and now >= o.kill_at:
                o.killed = True
                if o.owner is not None:
                    self._orphans_sigkilled.add(o.owner)
                runner.signal_tree(o.pid, signal.SIGKILL)
        self._pool.on_time(now)

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

    def _finish_drained(self, now: float) -> None:
        for key, proc in list(self._runs.items()):
            if proc.running:
                continue
            # An orphan without a cookie or group to tell whose it is may be this task's:
            # every task that ends meanwhile waits for it too (it dies within the grace).
            if self._orphans_of.get(key) or self._orphans_of.get(None):
                assert proc.kill_at is not None
                if now < proc.kill_at + DRAIN_LIMIT:
                    continue
                log.error(
                    "task %s ended but %d of its processes survived SIGKILL; giving its result",
                    key,
                    self._orphans_of.get(key, 0) + self._orphans_of.get(None, 0),
                )
            if proc.cgroup is not None and not self._group_removed(proc, now):
                continue
            del self._runs[key]
            self._pgids.pop(proc.pgid, None)
            self._end_output(proc)
            self._emit(proc.result(key in self._orphans_sigkilled))
            self._orphans_sigkilled.discard(key)

    def _group_removed(self, proc: RunProcess, now: float) -> bool:
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
            proc.cgroup_killed_at = now
            self._emptying.add(proc.key)
            log.debug(
                "task %s ended with processes left in %s; killing them", proc.key, proc.cgroup
            )
            cgroups.kill(proc.cgroup)
            return False
        if now < proc.cgroup_killed_at + DRAIN_LIMIT:
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

    def _children(self, *, all_threads: bool = True) -> list[int]:
        """The daemon's children. Without `all_threads`, those of its main thread only: what
        the sweep looks for. An orphan goes to the first live thread of its subreaper (the
        main one, the kernel's find_new_reaper), whichever thread started its task, and the
        spawner threads' own children are the task leaders, known by pid. Reading one file
        instead of one per thread is most of a sweep's cost, paid on every task's end."""
        kids = procfs.children("self", thread=None if all_threads else os.getpid())
        if kids is None:  # no CONFIG_PROC_CHILDREN: the slow way, a scan of /proc
            kids = [p.pid for p in psutil.Process().children()]
        return kids

    def _stray_children(self) -> bool:
        """At close: any child left that is not a helper of the daemon?"""
        known = self._spared | set(self._leaders) | set(self._orphans)
        for pid in self._children():
            if pid in known:
                continue
            st = procfs.stat(pid)
            if st is not None and not (st.state == "Z" and st.pgid == self._daemon_pgid):
                return True
        return False

    def _sweep(self, now: float, closing: bool) -> None:
        self._register_spawned()
        kids = self._children(all_threads=closing)
        # A child a spawner started that this thread has not registered yet carries a
        # pending task's cookie, or before its exec none, in the daemon's group or (after
        # its setpgid) in its own: left alone until it is registered (not taken for an
        # orphan, nor reaped in Popen's place). Its stat and its environment are two reads
        # it can exec between, so any of these is enough. The price: while spawns are
        # pending, a zombie that led its own group waits for a later sweep, and so does a
        # `setsid` escapee that also cleared its environment.
        pending = bool(self._spawning)
        workers = self._pool.worker_pids()
        for pid in kids:
            if pid in self._leaders or pid in self._orphans or pid in self._spared:
                continue
            if pid in workers:
                continue
            st = procfs.stat(pid)
            if st is None:
                continue
            found = None if st.state == "Z" else procfs.cookie(pid)
            cookie = None if found is None else found.key
            if pending and (
                cookie in self._spawning or (cookie is None and st.pgid in (pid, self._daemon_pgid))
            ):
                continue
            if st.state == "Z":
                if st.pgid != self._daemon_pgid:  # an orphan that ended on its own
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                continue
            if cookie is None and st.pgid == self._daemon_pgid:
                self._spared.add(pid)
                continue
            self._track(pid, cookie if cookie is not None else self._pgids.get(st.pgid))
        if self._spared:
            self._spared.intersection_update(kids)
        if not self._orphans:
            return
        live: set[str] = set()
        if not closing:
            live = {k for k, p in self._runs.items() if p.running} | self._pool.live_keys()
        for o in self._orphans.values():
            if o.kill_at is None and (o.owner is None or o.owner not in live):
                proc = self._runs.get(o.owner) if o.owner is not None else None
                kill_at = proc.kill_at if proc is not None and proc.kill_at else None
                o.kill_at = kill_at if kill_at is not None else now + self._grace
                runner.signal_tree(o.pid, signal.SIGTERM)

    def _track(self, pid: int, owner: str | None) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        o = _Orphan(pid=pid, pidfd=pidfd, owner=owner)
        self._orphans[pid] = o
        self._orphans_of[owner] = self._orphans_of.get(owner, 0) + 1
        self._reactor.register(pidfd, lambda: self._on_orphan_exit(o))
        log.debug("orphan pid=%d of task %s tracked", pid, owner)

    def _on_orphan_exit(self, o: _Orphan) -> None:
        try:
            pid, _ = os.waitpid(o.pid, os.WNOHANG)
        except ChildProcessError:
            pid = o.pid  # someone else reaped it
        if pid == 0:
            return
        self._reactor.unregister(o.pidfd)
        os.close(o.pidfd)
        del self._orphans[o.pid]
        left = self._orphans_of.get(o.owner, 1) - 1
        if left:
            self._orphans_of[o.owner] = left
        else:
            self._orphans_of.pop(o.owner, None)
