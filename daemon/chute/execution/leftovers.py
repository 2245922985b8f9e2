"""Ending what an owner that died left running, and marking its foreground run interrupted.

Owns: ending what a dead owner left (its cgroups, the process groups and call: workers it
recorded, and processes whose environment names one of its runs); marking a dead
foreground run `interrupted`. Not here: the owners, their locks and records
(chute.execution.owners), the groups themselves (chute.execution.cgroups), a live owner's
orphans (chute.execution.sweep).

What a dead owner left: every process in its cgroups (whatever left the process group or
cleared its environment); recorded pids whose start time is within START_SLACK of the
record (a recycled pid is not); and processes whose environment at exec carries a task
cookie (CHUTE_TASK_KEY) and the run folder (CHUTE_RUN_DIR) of one of its runs on this
spool. They get SIGTERM, the grace, then SIGKILL, each through a pidfd opened on the
process that was checked (or cgroup.kill). A live owner's runs are never touched: a
cookie of a run whose foreground lock is held is skipped, and only dead owners' groups
are ended.
When: the daemon, before it starts anything, ends what the previous daemon and dead
foreground runs left (end_leftovers, from chute.execution.owners.start_daemon); while it
runs (with retention) and in `chute gc`, end_dead_foreground ends dead foreground runs again.
Crash safety: a dead foreground run is marked interrupted (run.json, atomic) before its
lock file goes, and the lock file goes only once nothing of the run is left, so a sweeper
that crashes leaves the work to the next one; run.json already final is left as it is.
Two sweepers at once: the one that takes the lock does the work, the other sees it held
(or the name gone, or a different inode under it) and skips.
Diagnostics: one WARNING per owner whose leftovers were ended, one per run marked
interrupted; one ERROR when a group will not empty after SIGKILL.
Limits: without cgroups, a process that both left its process group and cleared its
environment (`setsid env -i …`) cannot be told from anyone else's once its owner died:
it survives (the live daemon's subreaper sweep still ends it with its task).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from chute.clock import rfc3339
from chute.execution import cgroups, owners, procfs
from chute.execution.owners import FOREGROUND, RUN_ID, DeadLock, Recorded, held, parse_record
from chute.faults import crash_point
from chute.store import atomic, rundir
from chute.store.spool import Spool

log = logging.getLogger(__name__)

START_SLACK = 1.0  # seconds between a recorded start and the process's start time in /proc
SWEEP_GRACE = 1.0
"""The most the daemon's periodic sweep waits between SIGTERM and SIGKILL to a dead `chute
run`'s tasks, and again after SIGKILL: it waits on the daemon's loop."""
_WAIT_STEP = 0.02


def _run_of(pid: int) -> tuple[str, str] | None:
    """(run folder, run id) of the task whose cookie the process's environment carries."""
    found = procfs.cookie(pid)
    if found is None or found.run_dir is None:
        return None
    return found.run_dir, os.path.basename(found.run_dir)


class _Live:
    """Whether a run's foreground owner lives, decided after the run's processes or groups
    were seen: a foreground run takes its lock before it makes its group or starts a task,
    so one that started after the lock files were listed is still seen alive."""

    def __init__(self, spool: Spool, live: set[str], dead: set[str]):
        self._folder = spool.state / FOREGROUND
        self._known = dict.fromkeys(live, True) | dict.fromkeys(dead, False)

    def __call__(self, run_id: str) -> bool:
        known = self._known.get(run_id)
        if known is None:
            known = self._known[run_id] = held(self._folder / run_id)
        return known


class _Leftovers:
    """What one dead owner left running, each process held by a pidfd once checked."""

    def __init__(self, what: str):
        self.what = what
        self.groups: list[Path] = []
        self.pidfds: dict[int, int] = {}
        self.leaders: set[int] = set()
        self.found: set[int] = set()
        self.removed = True

    def add_group(self, path: Path) -> None:
        hier = cgroups.hierarchy()
        if hier is None or path in self.groups:
            return
        if not (hier.within(path) and cgroups.is_owner_group(path) and path.is_dir()):
            return
        self.groups.append(path)
        self.found.update(cgroups.members(path))

    def add_recorded(self, pid: int, started: float, leader: bool, live: _Live) -> None:
        """A recorded process, if it is still the one recorded and no live owner's."""
        if self._started(pid, started):
            self._hold(pid, lambda: self._started(pid, started), live, leader)

    def add_task(self, pid: int, run_dir: str, live: _Live) -> None:
        """A process carrying the cookie of a task of the run at `run_dir`."""
        self._hold(pid, lambda: (c := _run_of(pid)) is not None and c[0] == run_dir, live)

    @staticmethod
    def _started(pid: int, started: float) -> bool:
        st = procfs.stat(pid)
        return st is not None and abs(st.start - started) <= START_SLACK

    def _hold(self, pid: int, still: Callable[[], bool], live: _Live, leader: bool = False) -> None:
        if pid in self.pidfds or pid == os.getpid():
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        # Checked again through /proc after the pidfd exists, then the pidfd is still live:
        # /proc spoke of the pidfd's process, so the signals go to the process checked.
        run = _run_of(pid)
        ok = still() and (run is None or not live(run[1]))
        if not ok or procfs.exited(pidfd):
            os.close(pidfd)
            return
        self.pidfds[pid] = pidfd
        self.found.add(pid)
        if leader:
            self.leaders.add(pid)

    def signal(self, sig: int) -> None:
        for group in self.groups:
            if sig == signal.SIGKILL:
                cgroups.kill(group)
            else:
                cgroups.signal_members(group, sig)
        for pid, pidfd in self.pidfds.items():
            if procfs.exited(pidfd):
                continue
            with contextlib.suppress(ProcessLookupError):
                if pid in self.leaders:
                    os.killpg(pid, sig)  # its group: the leader lives, so the pgid is its own
                signal.pidfd_send_signal(pidfd, sig)

    def alive(self) -> bool:
        return any(cgroups.populated(g) for g in self.groups) or any(
            not procfs.exited(fd) for fd in self.pidfds.values()
        )

    def close(self) -> None:
        for group in self.groups:
            if not cgroups.remove_tree(group):
                log.error("cgroup %s still holds processes after SIGKILL; leaving it", group)
                self.removed = False
                continue
            with contextlib.suppress(OSError):  # the spool's group, unless another owner's is in it
                os.rmdir(group.parent)
        for pidfd in self.pidfds.values():
            os.close(pidfd)
        self.pidfds.clear()


def _end(parts: list[_Leftovers], grace: float, settle: float = cgroups.EMPTY_WAIT) -> None:
    """SIGTERM to everything, up to `grace` for it to end, SIGKILL to the rest and up to
    `settle` for that; then remove the groups (one still busy is kept for the next time)."""
    for part in parts:
        part.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.alive() for p in parts) and time.monotonic() < deadline:
        time.sleep(_WAIT_STEP)
    for part in parts:
        if part.alive():
            part.signal(signal.SIGKILL)
    deadline = time.monotonic() + settle
    while any(p.alive() for p in parts) and time.monotonic() < deadline:
        time.sleep(_WAIT_STEP)
    for part in parts:
        part.close()


@dataclass(slots=True)
class _Dead:
    """A foreground owner found dead (its lock is ours now) and what it left."""

    lock: DeadLock
    left: _Leftovers


def _dead_foreground(spool: Spool) -> tuple[set[str], list[_Dead]]:
    """Run ids whose foreground owner lives, and the dead owners, their locks held here."""
    live, locks = owners.foreground_locks(spool)
    dead = []
    for lock in locks:
        owner = lock.recorded.owner
        who = f"pid {owner}" if owner is not None else "pid unknown"
        dead.append(_Dead(lock, _Leftovers(f"the `chute run` ({who})")))
    return live, dead


def _task_processes(spool: Spool) -> list[tuple[int, str, str]]:
    """(pid, run folder, run id) of processes carrying the cookie of a task of a run of this
    spool, found in /proc; not this process nor its ancestors."""
    mine = procfs.ancestors()
    runs = os.path.realpath(spool.runs)
    found = []
    for pid in procfs.pids():
        if pid in mine:
            continue
        run = _run_of(pid)
        if run is None or not RUN_ID.fullmatch(run[1]):
            continue
        if os.path.realpath(os.path.dirname(run[0])) == runs:
            found.append((pid, run[0], run[1]))
    return found


def end_leftovers(spool: Spool, grace: float) -> None:
    """At daemon start, with state/lock held and nothing started yet: end what the previous
    daemon left (its record, its group, the cookies of this spool's runs) and what dead
    foreground runs left, and mark those runs interrupted."""
    names, dead = _dead_foreground(spool)
    live = _Live(spool, names, {d.lock.run_id for d in dead})
    previous = _Leftovers("a previous daemon")
    try:
        recorded = parse_record((spool.state / "tasks.log").read_bytes())
    except FileNotFoundError:
        recorded = Recorded()
    for path in recorded.cgroups:
        previous.add_group(path)
    for pid, started, leader in recorded.pids:
        previous.add_recorded(pid, started, leader, live)
    by_run = {d.lock.run_id: d.left for d in dead}
    _add_records(dead, live)
    for name, path in cgroups.owner_groups(spool.root, leaf=True).items():
        run_id = name.removeprefix(cgroups.FOREGROUND_PREFIX)
        if name == cgroups.DAEMON:
            previous.add_group(path)
        elif not live(run_id):
            by_run.get(run_id, previous).add_group(path)
    for pid, run_dir, run_id in _task_processes(spool):
        if not live(run_id):
            by_run.get(run_id, previous).add_task(pid, run_dir, live)
    _end([previous, *(d.left for d in dead)], grace)
    if previous.found:
        log.warning(
            "killing %d process(es) left by a previous daemon: %s",
            len(previous.found),
            sorted(previous.found),
        )
    for d in dead:
        _settle(spool, d)


def end_dead_foreground(spool: Spool, grace: float, *, budget: float | None = None) -> list[str]:
    """End what foreground runs whose owner died left, mark their runs interrupted; returns
    the ids of the runs it marked. Safe beside a live daemon and live foreground runs
    (`chute gc`, and the daemon's retention pass, which gives a `budget` of SWEEP_GRACE:
    the most it waits before SIGKILL, and again after it)."""
    names, dead = _dead_foreground(spool)
    if not dead:
        return []
    live = _Live(spool, names, {d.lock.run_id for d in dead})
    by_run = {d.lock.run_id: d.left for d in dead}
    _add_records(dead, live)
    for pid, run_dir, run_id in _task_processes(spool):
        if run_id in by_run:
            by_run[run_id].add_task(pid, run_dir, live)
    settle = cgroups.EMPTY_WAIT if budget is None else min(budget, cgroups.EMPTY_WAIT)
    _end([d.left for d in dead], grace if budget is None else min(grace, budget), settle)
    crash_point("owners.ended")  # nothing new is durable: the next sweep does it all again
    return [d.lock.run_id for d in dead if _settle(spool, d)]


def _add_records(dead: list[_Dead], live: _Live) -> None:
    for d in dead:
        for path in d.lock.recorded.cgroups:
            d.left.add_group(path)
        for pid, started, leader in d.lock.recorded.pids:
            d.left.add_recorded(pid, started, leader, live)


def _settle(spool: Spool, d: _Dead) -> bool:
    """A dead foreground run whose leftovers are ended: run.json says interrupted, then the
    lock file goes (kept while a group would not empty: the next sweep tries again). True
    when it marked the run."""
    try:
        marked = _interrupt(spool, d.lock.run_id, d.lock.recorded.owner)
        crash_point("owners.interrupted")  # run.json final (durable), the lock file still there
        ended = len(d.left.found)
        if marked or ended:
            log.warning(
                "%s interrupted: %s that ran it is gone; %s",
                d.lock.run_id,
                d.left.what,
                f"killed {ended} process(es) it left: {sorted(d.left.found)}"
                if ended
                else "none of its processes were left",
            )
        if d.left.removed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d.lock.path)
        return marked
    finally:
        os.close(d.lock.fd)


def _interrupt(spool: Spool, run_id: str, owner_pid: int | None) -> bool:
    """Mark a foreground run whose owner died `interrupted` (final: nothing resumes it);
    False when it has no run.json or a final one."""
    path = spool.runs / run_id / "run.json"
    try:
        rec = rundir.read_json(path)
    except (FileNotFoundError, orjson.JSONDecodeError):
        return False
    if rec.get("state") in rundir.FINAL_RUN_STATES:
        return False
    who = f" (pid {owner_pid})" if owner_pid is not None else ""
    rec["state"] = "interrupted"
    rec["error"] = (
        f"the `chute {'retry' if rec.get('trigger', {}).get('type') == 'retry' else 'run'}` "
        f"process{who} that ran it ended before the run did; a foreground run is not resumed "
        f"(`chute retry {run_id}` makes a new run from it)"
    )
    wall = time.time()
    rec["finished_at"] = rfc3339(wall)
    from chute.engine.recovery import settle_manifest  # the engine imports the executor

    # The manifest first, then the final run.json that says the run is over: nothing left
    # open in it (chute.engine.recovery.settle_manifest), then the lock file goes.
    settle_manifest(spool.runs / run_id, rec["error"], wall)
    atomic.write_json(path, rec)
    return True
