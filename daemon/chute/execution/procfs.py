"""What the kernel says about a process: its /proc files, read one way, and its pidfd.

Owns: every read of /proc in chute.execution (a process's state, parent, group and start
time; its children; its cgroup; the task cookie in its environment; the process ids; the
cgroup2 mount) and of a cgroup's files; the boot clock that start times are counted on;
the task cookie itself: CHUTE_TASK_KEY, which every task's environment carries
(chute.execution.runner, chute.execution.worker), beside the CHUTE_RUN_DIR of its run.
Not here: what the readings mean (the orphan sweep: chute.execution.sweep; a dead owner's
leftovers: chute.execution.leftovers; groups: chute.execution.cgroups), and signals.
Diagnostics: none: a process or group that is gone reads as None (or no children), and the
caller decides what that means.
Limits: a pid read here can name another process by the next read. A caller that signals
opens a pidfd first and reads again after it, so the reading is about the pidfd's process.
/proc/<pid>/task/*/children needs CONFIG_PROC_CHILDREN (every distribution kernel has it):
without it `children` says None and the caller scans another way.
"""

from __future__ import annotations

import os
import re
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TASK_KEY_VAR = "CHUTE_TASK_KEY"
"""The cookie every task's environment carries, so the sweeps can tell whose orphan it is."""
RUN_DIR_VAR = "CHUTE_RUN_DIR"

TICKS = os.sysconf("SC_CLK_TCK")
HAS_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def read(path: str | Path) -> bytes | None:
    """A whole /proc or cgroup file, or None when its process or group is gone.

    Unbuffered: the orphan sweep reads a few of these on every task's end, and a buffered
    file object is work a one-shot read does not need. PermissionError (another user's
    environment) is the caller's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:  # ESRCH: the process ended; ENODEV: the group was removed
        return None
    finally:
        os.close(fd)
    return b"".join(chunks)


def boot_clock() -> float:
    """Seconds since boot, the clock of a process's start time (Stat.start)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/<pid>/stat that chute reads."""

    state: str  # R, S, D, Z, ...
    ppid: int
    pgid: int
    start: float  # seconds since boot (boot_clock)


def stat(pid: int) -> Stat | None:
    raw = read(f"/proc/{pid}/stat")
    if not raw:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # the name in parentheses may hold spaces
    return Stat(
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        start=int(fields[19]) / TICKS,
    )


def children(pid: int | str, *, thread: int | None = None) -> list[int] | None:
    """Direct children of `pid` from /proc/<pid>/task/*/children (with `thread`: of that
    thread alone); None without that file (CONFIG_PROC_CHILDREN)."""
    base = f"/proc/{pid}/task"
    if thread is not None:
        tids: list[str] = [str(thread)]
    else:
        try:
            tids = os.listdir(base)
        except FileNotFoundError:
            return []
    kids: list[int] = []
    for tid in tids:
        raw = read(f"{base}/{tid}/children")
        if raw is None:
            if not HAS_PROC_CHILDREN:
                return None
            continue
        kids.extend(map(int, raw.split()))
    return kids


def pids() -> Iterator[int]:
    """Every process id in /proc, now."""
    return (int(name) for name in os.listdir("/proc") if name.isdigit())


def ancestors() -> set[int]:
    """This process and its ancestors up to init, which no sweep may signal."""
    mine = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        st = stat(pid)
        pid = st.ppid if st is not None else 0
    return mine


@dataclass(frozen=True, slots=True)
class Cookie:
    """The task cookie a process's environment carried at exec."""

    key: str  # CHUTE_TASK_KEY: the task
    run_dir: str | None  # CHUTE_RUN_DIR: its run's folder, when it has one


def cookie(pid: int) -> Cookie | None:
    """The task cookie in the environment of process `pid` as it was at exec, if any (None
    too for a process whose environment we may not read)."""
    try:
        raw = read(f"/proc/{pid}/environ")
    except PermissionError:
        return None
    key_prefix = TASK_KEY_VAR.encode() + b"="
    if not raw or key_prefix not in raw:
        return None
    run_prefix = RUN_DIR_VAR.encode() + b"="
    key = run_dir = None
    for entry in raw.split(b"\0"):
        if key is None and entry.startswith(key_prefix):
            key = entry[len(key_prefix) :].decode(errors="replace")
        elif run_dir is None and entry.startswith(run_prefix):
            run_dir = entry[len(run_prefix) :].decode(errors="replace")
    return None if key is None else Cookie(key, run_dir)


def cgroup_of(pid: int | str = "self") -> str | None:
    """The v2 group of a process as /proc/<pid>/cgroup names it ("/a/b"), or None."""
    raw = read(f"/proc/{pid}/cgroup")
    if raw is None:
        return None
    for line in raw.splitlines():
        if line.startswith(b"0::"):
            return line[3:].decode(errors="replace")
    return None


def mount_of(fstype: str) -> tuple[str, str] | None:
    """(mount point, root within the filesystem) of the first mount of `fstype` that
    /proc/self/mountinfo lists, or None."""
    raw = read("/proc/self/mountinfo")
    for line in (raw or b"").decode(errors="replace").splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == fstype:
            fields = left.split(" ")
            return _unescape(fields[4]), _unescape(fields[3])
    return None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def exited(pidfd: int) -> bool:
    """Whether the process of `pidfd` has ended (its pidfd polls readable)."""
    return bool(select.select([pidfd], [], [], 0)[0])
