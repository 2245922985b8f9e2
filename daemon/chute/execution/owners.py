"""Who owns the processes chute starts, and ending what an owner that died left running.

Owns: the owners' records, state/tasks.log (the daemon's) and state/foreground/<run_id>
(the lock and record of one `chute run`, or `chute retry` without a daemon); ending what
a dead owner left (its cgroups, the process groups and call: workers it recorded, and
processes whose environment names one of its runs); marking a dead foreground run
`interrupted`. Not here: the daemon's spool lock (chute.daemon holds state/lock), the
groups themselves (chute.execution.cgroups), a live owner's processes (chute.execution.local).

Ownership is a lock the owner holds for its whole life, never a pid that can be reused:
the daemon holds state/lock; a foreground run's process holds an flock on
state/foreground/<run_id>, taken on a temp name that is then renamed into place, so the
name is never seen unlocked while its owner lives. What an owner starts is appended to
its record as it starts it (not synced: it matters only while the machine stays up, as
the processes do):
    owner <pid> <boot time>       first line of a foreground record
    cgroup <path>                 before the owner's cgroup is made (chute.execution.cgroups)
    <pgid> <boot time> <key>      each run: task (it leads its process group)
    worker <pid> <boot time>      each call: worker (forked by the forkserver: no task
                                  process group, no cookie in its /proc environ)
What a dead owner left: every process in its cgroups (whatever left the process group or
cleared its environment); recorded pids whose start time is within START_SLACK of the
record (a recycled pid is not); and processes whose environment at exec carries a task
cookie (CHUTE_TASK_KEY) and the run folder (CHUTE_RUN_DIR) of one of its runs on this
spool. They get SIGTERM, the grace, then SIGKILL, each through a pidfd opened on the
process that was checked (or cgroup.kill). A live owner's runs are never touched: a
cookie of a run whose foreground lock is held is skipped, and only dead owners' groups
are ended.
When: the daemon, before it starts anything, ends what the previous daemon and dead
foreground runs left (end_leftovers); while it runs (with retention) and in `chute gc`,
end_dead_foreground ends dead foreground runs again.
Crash safety: the daemon's record is started afresh only once what the previous one lists
is ended. A dead foreground run is marked interrupted (run.json, atomic) before its
lock file goes, and the lock file goes only once nothing of the run is left, so a sweeper
that crashes leaves the work to the next one; run.json already final is left as it is.
Two sweepers at once: the one that takes the lock does the work, the other sees it held
(or the name gone, or a different inode under it) and skips.
Diagnostics: one WARNING per owner whose leftovers were ended, one per run marked
interrupted; one ERROR when a group will not empty after SIGKILL.
Limits: without cgroups, a process that both left its process group and cleared its
environment (`setsid env -i …`) cannot be told from anyone else's once its owner died:
it survives (the live daemon's subreaper sweep still ends it with its task).
state/tasks.log gains a line per task for the daemon's whole life, and a start reads it
all (a /proc read per line).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from chute.clock import rfc3339
from chute.execution import cgroups
from chute.execution.runner import TASK_KEY_VAR, read_proc
from chute.faults import crash_point
from chute.store import atomic, rundir
from chute.store.spool import Spool

log = logging.getLogger(__name__)

TICKS = os.sysconf("SC_CLK_TCK")
START_SLACK = 1.0  # seconds between a recorded start and the process's start time in /proc
FOREGROUND = "foreground"  # state/foreground/<run_id>
RUN_DIR_VAR = "CHUTE_RUN_DIR"
SWEEP_GRACE = 1.0
"""The most the daemon's periodic sweep waits between SIGTERM and SIGKILL to a dead `chute
run`'s tasks, and again after SIGKILL: it waits on the daemon's loop."""
_RUN_ID = re.compile(r"\d{8}_\d{6}_[0-9a-f]{6}")
_WAIT_STEP = 0.02


def boot_clock() -> float:
    """Seconds since boot, the clock of a process's start time in /proc/<pid>/stat."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _start_time(pid: int) -> float | None:
    """Field 22 of /proc/<pid>/stat, in seconds since boot."""
    raw = read_proc(f"/proc/{pid}/stat")
    if not raw:
        return None
    return int(raw[raw.rindex(b")") + 2 :].split()[19]) / TICKS


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


# -- records ------------------------------------------------------------------------------


class Record:
    """An owner's append-only list of what it started (see the module docstring); appends
    are single write(2)s on an O_APPEND descriptor, safe from the spawner threads."""

    def __init__(self, fd: int):
        self._fd = fd

    @classmethod
    def create(cls, path: Path) -> Record:
        """A fresh record at `path` (the daemon's state/tasks.log, once the previous one's
        leftovers are ended)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        return cls(os.open(path, flags, 0o644))

    def cgroup(self, path: Path) -> None:
        self._put(f"cgroup {path}\n")

    def task(self, key: str, pgid: int) -> None:
        # The boot-clock time of the spawn, not /proc/<pid>/stat of the new child (reading
        # that while it execs cost as much as the spawn): it is matched within START_SLACK.
        self._put(f"{pgid} {boot_clock():.3f} {key}\n")

    def worker(self, pid: int) -> None:
        self._put(f"worker {pid} {boot_clock():.3f}\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _put(self, line: str) -> None:
        os.write(self._fd, line.encode())


@dataclass(slots=True)
class Recorded:
    """A record as read back."""

    owner: int | None = None
    cgroups: list[Path] = field(default_factory=list)
    pids: list[tuple[int, float, bool]] = field(default_factory=list)  # pid, start, leads group


def parse_record(raw: bytes) -> Recorded:
    out = Recorded()
    for line in raw.decode(errors="replace").splitlines():
        head, _, rest = line.partition(" ")
        parts = rest.split(" ")
        try:
            if head == "cgroup":
                out.cgroups.append(Path(rest))
            elif head == "owner":
                out.owner = int(parts[0])
            elif head == "worker":
                out.pids.append((int(parts[0]), float(parts[1]), False))
            elif head.isdigit():
                out.pids.append((int(head), float(parts[0]), True))
        except (ValueError, IndexError):
            continue  # a line cut by the crash
    return out


# -- owners -------------------------------------------------------------------------------


class Owner:
    """One process that starts tasks on a spool (the daemon, or one foreground run): its
    record, its cgroup (None without one), and a foreground run's lock file."""

    def __init__(
        self,
        record: Record,
        cgroup: cgroups.OwnerGroup | str,
        lock: Path | None,
    ):
        """`cgroup`: the owner's group, or why it has none."""
        self.record = record
        self.cgroup = cgroup if isinstance(cgroup, cgroups.OwnerGroup) else None
        self.lock = lock
        if isinstance(cgroup, str):
            self.fence = (
                f"cgroups unavailable: {cgroup}; tasks are fenced by process groups, the "
                "subreaper and the task cookie (a process that leaves its group and clears "
                "its environment can outlive a crash)"
            )
        else:
            self.fence = f"tasks run in cgroups under {cgroup.path}"

    def release(self) -> None:
        """After its executor is closed (nothing of the owner runs): the lock file goes, then
        the lock."""
        if self.lock is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock)
        self.record.close()


def start_daemon(spool: Spool, grace: float) -> Owner:
    """The daemon as an owner, once it holds state/lock and before it starts anything: what
    the previous daemon and dead foreground runs left is ended first. The daemon logs the
    owner's `fence` once it has started."""
    end_leftovers(spool, grace)
    record = Record.create(spool.state / "tasks.log")
    group = cgroups.setup(spool.root, cgroups.DAEMON, leaf=True, note=record.cgroup)
    return Owner(record, group, None)


def start_foreground(spool: Spool, run_id: str) -> Owner:
    """A foreground run (`chute run`, `chute retry` without a daemon) as an owner: its lock
    is taken before its run folder exists, and held until release()."""
    folder = spool.state / FOREGROUND
    folder.mkdir(exist_ok=True)
    lock = folder / run_id
    fd = atomic.create_locked(lock, f"owner {os.getpid()} {boot_clock():.3f}\n".encode())
    record = Record(fd)
    owner = f"{cgroups.FOREGROUND_PREFIX}{run_id}"
    group = cgroups.setup(spool.root, owner, leaf=False, note=record.cgroup)
    made = Owner(record, group, lock)
    log.debug("%s", made.fence)
    return made


# -- leftovers ----------------------------------------------------------------------------


def _cookie(pid: int) -> tuple[str, str] | None:
    """(run folder, run id) of the task whose cookie the process's environment carries."""
    try:
        raw = read_proc(f"/proc/{pid}/environ")
    except PermissionError:
        return None
    if not raw or (TASK_KEY_VAR.encode() + b"=") not in raw:
        return None
    prefix = RUN_DIR_VAR.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(prefix):
            run_dir = entry[len(prefix) :].decode(errors="replace")
            return run_dir, os.path.basename(run_dir)
    return None


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
            known = self._known[run_id] = _held(self._folder / run_id)
        return known


def _held(path: Path) -> bool:
    """Whether someone holds the lock on `path` (False when it does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


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
        self._hold(pid, lambda: (c := _cookie(pid)) is not None and c[0] == run_dir, live)

    @staticmethod
    def _started(pid: int, started: float) -> bool:
        now = _start_time(pid)
        return now is not None and abs(now - started) <= START_SLACK

    def _hold(self, pid: int, still: Callable[[], bool], live: _Live, leader: bool = False) -> None:
        if pid in self.pidfds or pid == os.getpid():
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        # Checked again through /proc after the pidfd exists, then the pidfd is still live:
        # /proc spoke of the pidfd's process, so the signals go to the process checked.
        cookie = _cookie(pid)
        ok = still() and (cookie is None or not live(cookie[1]))
        if not ok or _exited(pidfd):
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
            if _exited(pidfd):
                continue
            with contextlib.suppress(ProcessLookupError):
                if pid in self.leaders:
                    os.killpg(pid, sig)  # its group: the leader lives, so the pgid is its own
                signal.pidfd_send_signal(pidfd, sig)

    def alive(self) -> bool:
        return any(cgroups.populated(g) for g in self.groups) or any(
            not _exited(fd) for fd in self.pidfds.values()
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
    """A foreground owner found dead: its lock is ours now."""

    run_id: str
    path: Path
    fd: int
    recorded: Recorded
    left: _Leftovers


def _foreground_owners(spool: Spool) -> tuple[set[str], list[_Dead]]:
    """Run ids whose foreground owner lives (holds its lock), and the dead ones, whose
    locks this process now holds."""
    folder = spool.state / FOREGROUND
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return set(), []
    live: set[str] = set()
    dead: list[_Dead] = []
    for name in names:
        path = folder / name
        temp = name.startswith(atomic.TMP_PREFIX)
        if not temp and not _RUN_ID.fullmatch(name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone (a sweeper or its owner removed it), or not a plain file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not temp:
                live.add(name)
            continue
        try:
            st = os.stat(path, follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        except FileNotFoundError:
            same = False
        if not same:  # removed (and maybe made again) by someone else meanwhile
            os.close(fd)
            continue
        if temp:  # a crash between creating a lock file and naming it: it named nothing
            os.unlink(path)
            os.close(fd)
            continue
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        recorded = parse_record(b"".join(chunks))
        who = f"pid {recorded.owner}" if recorded.owner is not None else "pid unknown"
        dead.append(_Dead(name, path, fd, recorded, _Leftovers(f"the `chute run` ({who})")))
    return live, dead


def _task_processes(spool: Spool) -> list[tuple[int, str, str]]:
    """(pid, run folder, run id) of processes carrying the cookie of a task of a run of this
    spool, found in /proc; not this process nor its ancestors."""
    mine = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        raw = read_proc(f"/proc/{pid}/stat")
        pid = int(raw[raw.rindex(b")") + 2 :].split()[1]) if raw else 0
    runs = os.path.realpath(spool.runs)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in mine:
            continue
        cookie = _cookie(int(name))
        if cookie is None or not _RUN_ID.fullmatch(cookie[1]):
            continue
        if os.path.realpath(os.path.dirname(cookie[0])) == runs:
            found.append((int(name), cookie[0], cookie[1]))
    return found


def end_leftovers(spool: Spool, grace: float) -> None:
    """At daemon start, with state/lock held and nothing started yet: end what the previous
    daemon left (its record, its group, the cookies of this spool's runs) and what dead
    foreground runs left, and mark those runs interrupted."""
    names, dead = _foreground_owners(spool)
    live = _Live(spool, names, {d.run_id for d in dead})
    previous = _Leftovers("a previous daemon")
    try:
        recorded = parse_record((spool.state / "tasks.log").read_bytes())
    except FileNotFoundError:
        recorded = Recorded()
    for path in recorded.cgroups:
        previous.add_group(path)
    for pid, started, leader in recorded.pids:
        previous.add_recorded(pid, started, leader, live)
    by_run = {d.run_id: d.left for d in dead}
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
    names, dead = _foreground_owners(spool)
    if not dead:
        return []
    live = _Live(spool, names, {d.run_id for d in dead})
    by_run = {d.run_id: d.left for d in dead}
    _add_records(dead, live)
    for pid, run_dir, run_id in _task_processes(spool):
        if run_id in by_run:
            by_run[run_id].add_task(pid, run_dir, live)
    settle = cgroups.EMPTY_WAIT if budget is None else min(budget, cgroups.EMPTY_WAIT)
    _end([d.left for d in dead], grace if budget is None else min(grace, budget), settle)
    crash_point("owners.ended")  # nothing new is durable: the next sweep does it all again
    return [d.run_id for d in dead if _settle(spool, d)]


def _add_records(dead: list[_Dead], live: _Live) -> None:
    for d in dead:
        for path in d.recorded.cgroups:
            d.left.add_group(path)
        for pid, started, leader in d.recorded.pids:
            d.left.add_recorded(pid, started, leader, live)


def _settle(spool: Spool, d: _Dead) -> bool:
    """A dead foreground run whose leftovers are ended: run.json says interrupted, then the
    lock file goes (kept while a group would not empty: the next sweep tries again). True
    when it marked the run."""
    try:
        marked = _interrupt(spool, d.run_id, d.recorded.owner)
        crash_point("owners.interrupted")  # run.json final (durable), the lock file still there
        ended = len(d.left.found)
        if marked or ended:
            log.warning(
                "%s interrupted: %s that ran it is gone; %s",
                d.run_id,
                d.left.what,
                f"killed {ended} process(es) it left: {sorted(d.left.found)}"
                if ended
                else "none of its processes were left",
            )
        if d.left.removed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d.path)
        return marked
    finally:
        os.close(d.fd)


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
    now = time.time()
    rec["finished_at"] = rfc3339(now)
    from chute.engine.recovery import settle_manifest  # the engine imports the executor

    # The manifest first, then the final run.json that says the run is over: nothing left
    # open in it (chute.engine.recovery.settle_manifest), then the lock file goes.
    settle_manifest(spool.runs / run_id, rec["error"], now)
    atomic.write_json(path, rec)
    return True
