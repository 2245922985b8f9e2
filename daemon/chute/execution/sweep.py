"""The orphan sweep: what a task's processes leave behind is found and ended with the task.

Owns: the daemon's role of child subreaper, the orphans it tracks (a pidfd each, watched by
the caller's reactor) and their SIGTERM → grace → SIGKILL. Not here: the tasks themselves
and when to sweep (chute.execution.local), the /proc readings (chute.execution.procfs), a
dead owner's leftovers after a crash (chute.execution.leftovers).

No process a task started outlives the task. A task's main process leads its own process
group; when it ends (any reason) the group gets SIGTERM while the unreaped main process
still holds the pgid. Processes that left the group (`setsid`) are caught because the
daemon is a child subreaper (PR_SET_CHILD_SUBREAPER): every process whose parent dies is
reparented to us, so after a task's main process ends, everything left of the task is in
a tree under one of our direct children that is not a live task. A sweep reads our
children (/proc/self/task/*/children: one small read per daemon thread) and, for each
child it does not know, the CHUTE_TASK_KEY cookie every task's environment carries (as
Jenkins' ProcessTreeKiller does with BUILD_ID):
- cookie of a live task: watched (pidfd), ended with its task;
- cookie of an ended task: its tree gets SIGTERM, SIGKILL after the grace, then reaped;
- no cookie (the task cleared its environment) and outside the daemon's own process group:
  also an orphan of a task, since that is the only way such a child can become ours
  (attributed to a task by pgid when it still is in the task's group); ended the same way.
Other children the daemon starts itself (multiprocessing's forkserver and resource tracker,
helpers of other modules) stay in the daemon's process group and keep their environment
without a cookie, so the sweep leaves them alone (spared): daemon code must not start
children in a new process group or session except through chute.execution.local.
Reaping is by pid only (waitpid(pid) for orphans), never waitpid(-1), which would steal the
children of Popen and multiprocessing.
Crash safety: nothing durable is written here; after a crash the owner's record ends what
is left (chute.execution.owners).
Diagnostics: none of its own; the executor logs a task whose orphans survive SIGKILL.
Limits: called from the loop's thread only. A double-forked process of a call: task
(reparented to us, in the daemon's process group) that exits before a sweep sees it stays
a zombie: the sweep does not reap in the daemon's group.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass

import psutil

from chute.execution import procfs
from chute.execution.runprocess import kill
from chute.reactor import Reactor

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36

_subreaper_done = False


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


@dataclass(slots=True)
class _Orphan:
    pid: int
    pidfd: int
    owner: str | None  # the task key it belongs to, when known
    kill_at: float | None = None  # set once it got SIGTERM
    killed: bool = False


class Orphans:
    """The orphans of this process's tasks, found by `sweep` and ended by `end`."""

    def __init__(self, reactor: Reactor):
        become_subreaper()
        self._reactor = reactor
        self._daemon_pgid = os.getpgid(0)
        self._tracked: dict[int, _Orphan] = {}
        self._count_of: dict[str | None, int] = {}  # owner key → tracked orphans
        self._sigkilled: set[str] = set()  # owner keys whose orphans got SIGKILL
        self._spared: set[int] = set()  # our children that are not tasks' (forkserver, …)

    def __bool__(self) -> bool:
        return bool(self._tracked)

    def __iter__(self) -> Iterator[int]:
        return iter(self._tracked)

    def left(self, key: str) -> int:
        """Orphans that may be task `key`'s: its own and those nobody can tell whose."""
        return self._count_of.get(key, 0) + self._count_of.get(None, 0)

    def sigkilled(self, key: str) -> bool:
        """Whether an orphan of task `key` got SIGKILL (asked once, at its Result)."""
        if key in self._sigkilled:
            self._sigkilled.discard(key)
            return True
        return False

    def children(self, *, all_threads: bool = True) -> list[int]:
        """The daemon's children. Without `all_threads`, those of its main thread only: what
        the sweep looks for. An orphan goes to the first live thread of its subreaper (the
        main one, the kernel's find_new_reaper), whichever thread started its task, and the
        spawner threads' own children are the task leaders, known by pid. Reading one file
        instead of one per thread is most of a sweep's cost, paid on every task's end."""
        kids = procfs.children("self", thread=None if all_threads else os.getpid())
        if kids is None:  # no CONFIG_PROC_CHILDREN: the slow way, a scan of /proc
            kids = [p.pid for p in psutil.Process().children()]
        return kids

    def strays(self, known: Container[int]) -> bool:
        """At close: any child left that is neither `known`, tracked nor a daemon helper?"""
        for pid in self.children():
            if pid in known or pid in self._spared or pid in self._tracked:
                continue
            st = procfs.stat(pid)
            if st is not None and not (st.state == "Z" and st.pgid == self._daemon_pgid):
                return True
        return False

    def sweep(
        self,
        *,
        closing: bool,
        known: Container[int],
        pending: Container[str],
        task_of_group: Mapping[int, str],
    ) -> None:
        """Track the children that are not `known` (task leaders, workers) and are orphans
        of tasks; reap the zombies among them. `pending`: keys of tasks being spawned, whose
        children are left alone until they are known; `task_of_group`: pgid → task key."""
        kids = self.children(all_threads=closing)
        # A child a spawner started that the loop has not registered yet carries a
        # pending task's cookie, or before its exec none, in the daemon's group or (after
        # its setpgid) in its own: left alone until it is registered (not taken for an
        # orphan, nor reaped in Popen's place). Its stat and its environment are two reads
        # it can exec between, so any of these is enough. The price: while spawns are
        # pending, a zombie that led its own group waits for a later sweep, and so does a
        # `setsid` escapee that also cleared its environment.
        spawning = bool(pending)
        for pid in kids:
            if pid in known or pid in self._tracked or pid in self._spared:
                continue
            st = procfs.stat(pid)
            if st is None:
                continue
            found = None if st.state == "Z" else procfs.cookie(pid)
            cookie = None if found is None else found.key
            if spawning and (
                cookie in pending or (cookie is None and st.pgid in (pid, self._daemon_pgid))
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
            self._track(pid, cookie if cookie is not None else task_of_group.get(st.pgid))
        if self._spared:
            self._spared.intersection_update(kids)

    def end(
        self,
        mono: float,
        *,
        live: Container[str],
        kill_at: Callable[[str], float | None],
        grace: float,
    ) -> None:
        """SIGTERM to the trees of orphans whose task is not `live`; their SIGKILL is due
        with their task's (`kill_at(key)`), else `grace` seconds after `mono`."""
        for o in self._tracked.values():
            if o.kill_at is None and (o.owner is None or o.owner not in live):
                due = kill_at(o.owner) if o.owner is not None else None
                o.kill_at = due if due is not None else mono + grace
                signal_tree(o.pid, signal.SIGTERM)

    def restart(self) -> None:
        """Every tracked orphan gets SIGTERM again at the next `end`, whoever's it is."""
        for o in self._tracked.values():
            o.kill_at = None

    def on_time(self, mono: float) -> None:
        """SIGKILL to the trees whose grace is over."""
        for o in self._tracked.values():
            if o.kill_at is not None and not o.killed and mono >= o.kill_at:
                o.killed = True
                if o.owner is not None:
                    self._sigkilled.add(o.owner)
                signal_tree(o.pid, signal.SIGKILL)

    def next_time(self) -> float | None:
        """When on_time has a SIGKILL to send, or None."""
        times = [o.kill_at for o in self._tracked.values() if o.kill_at and not o.killed]
        return min(times) if times else None

    def kill(self) -> None:
        """SIGKILL to every tracked tree, now (close)."""
        for o in self._tracked.values():
            signal_tree(o.pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop watching: whatever is still tracked stays as it is."""
        for o in self._tracked.values():
            self._reactor.unregister(o.pidfd)
            os.close(o.pidfd)
        self._tracked.clear()
        self._count_of.clear()

    def _track(self, pid: int, owner: str | None) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        o = _Orphan(pid=pid, pidfd=pidfd, owner=owner)
        self._tracked[pid] = o
        self._count_of[owner] = self._count_of.get(owner, 0) + 1
        self._reactor.register(pidfd, lambda: self._on_exit(o))
        log.debug("orphan pid=%d of task %s tracked", pid, owner)

    def _on_exit(self, o: _Orphan) -> None:
        try:
            pid, _ = os.waitpid(o.pid, os.WNOHANG)
        except ChildProcessError:
            pid = o.pid  # someone else reaped it
        if pid == 0:
            return
        self._reactor.unregister(o.pidfd)
        os.close(o.pidfd)
        del self._tracked[o.pid]
        left = self._count_of.get(o.owner, 1) - 1
        if left:
            self._count_of[o.owner] = left
        else:
            self._count_of.pop(o.owner, None)


def signal_tree(pid: int, sig: int) -> None:
    """`sig` to `pid` and its descendants, parents first (they cannot fork replacements)."""
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        kids = procfs.children(p) or []
        kill(p, sig)
        todo.extend(kids)
