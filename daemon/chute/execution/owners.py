"""Who owns the processes chute starts: each owner's lock and its record of what it started.

Owns: the owners' records, state/tasks.log (the daemon's) and state/foreground/<run_id>
(the lock and record of one `chute run`, or `chute retry` without a daemon), and telling a
live foreground owner from a dead one by its lock. Not here: ending what a dead owner left
(chute.execution.leftovers), the daemon's spool lock (chute.daemon holds state/lock), the
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
Crash safety: the daemon's record is started afresh only once what the previous one lists
is ended (chute.execution.leftovers). A lock file whose owner is dead is taken by whoever
looks first (an exclusive flock), checked to be still the file under its name, and left to
the caller; a temp lock file (a crash between creating it and naming it) is removed.
Diagnostics: none of its own; an owner's `fence` says how its tasks are fenced.
Limits: state/tasks.log gains a line per task for the daemon's whole life, and a start
reads it all (a /proc read per line).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from chute.execution import cgroups, procfs
from chute.store import atomic
from chute.store.spool import Spool

log = logging.getLogger(__name__)

FOREGROUND = "foreground"  # state/foreground/<run_id>
RUN_ID = re.compile(r"\d{8}_\d{6}_[0-9a-f]{6}")  # a run id, as a lock file is named


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
        # The boot-clock time of the spawn, not /proc/<pid>/stat of the new child: no
        # /proc read on the spawner's thread per task, for a time that is only matched
        # within chute.execution.leftovers.START_SLACK.
        self._put(f"{pgid} {procfs.boot_clock():.3f} {key}\n")

    def worker(self, pid: int) -> None:
        self._put(f"worker {pid} {procfs.boot_clock():.3f}\n")

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
    from chute.execution.leftovers import end_leftovers  # leftovers reads our records

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
    fd = atomic.create_locked(lock, f"owner {os.getpid()} {procfs.boot_clock():.3f}\n".encode())
    record = Record(fd)
    owner = f"{cgroups.FOREGROUND_PREFIX}{run_id}"
    group = cgroups.setup(spool.root, owner, leaf=False, note=record.cgroup)
    made = Owner(record, group, lock)
    log.debug("%s", made.fence)
    return made


# -- locks --------------------------------------------------------------------------------


def held(path: Path) -> bool:
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


@dataclass(slots=True)
class DeadLock:
    """A foreground owner found dead: its lock file, whose lock this process now holds
    (`fd`), and its record as read back."""

    run_id: str
    path: Path
    fd: int
    recorded: Recorded


def foreground_locks(spool: Spool) -> tuple[set[str], list[DeadLock]]:
    """Run ids whose foreground owner lives (holds its lock), and the dead ones, whose
    locks this process now holds (the caller closes each DeadLock's fd)."""
    folder = spool.state / FOREGROUND
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return set(), []
    live: set[str] = set()
    dead: list[DeadLock] = []
    for name in names:
        path = folder / name
        temp = name.startswith(atomic.TMP_PREFIX)
        if not temp and not RUN_ID.fullmatch(name):
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
        dead.append(DeadLock(name, path, fd, parse_record(b"".join(chunks))))
    return live, dead
