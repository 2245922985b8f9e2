"""The cgroup of a task: made before it starts, joined before its program runs, killed and
removed with it, and found again after a crash.

Owns: chute's folders in the cgroup v2 hierarchy (its mount found in /proc/self/mountinfo):

    <base>/chute-<spool id>/<owner>/t-<task key>    one run: task and all it starts
    <base>/chute-<spool id>/<owner>/pool            the call: workers of that owner

<base> is the group the owner process was in when it started; <spool id> a hash of the
spool's real path, so daemons on two spools never touch each other's groups; <owner> is
`daemon` or `foreground-<run_id>` (`chute run`, or `chute retry` without a daemon), and
the owner's lock in state/ says whether it still lives (chute.execution.owners). A daemon
outside the root group (systemd with Delegate=yes) first moves itself into the leaf <base>/daemon:
a group with processes of its own cannot hand controllers to its children, and limits per
task will need them. Not here: which owner is dead (chute.execution.owners); the processes
(chute.execution.runner, chute.execution.worker, chute.execution.local).

Joining before the program runs: a cgroup fences only what joined it before it forked
(PITFALLS). Python 3.11 has no clone3(CLONE_INTO_CGROUP), so a run: task moves itself
before the user's command runs: `/bin/sh -c 'echo 0 >…/cgroup.procs || …; <the script>'`
for a string command (one line: the script's line numbers do not move) and `/bin/sh -c
'echo 0 >"$0" || …; exec "$@"' …/cgroup.procs <argv…>` for argv (join_argv). The daemon
pays only the group's mkdir and rmdir; the write, and for an argv command one more exec of
/bin/sh, are the task's own CPU. A `preexec_fn` instead would make Popen fork instead of
vfork, on the daemon's CPU, and run Python in the forked child of a threaded process;
writing the pid from the parent after Popen leaves a window in which the task may fork
outside its group. A call: worker joins its owner's
pool group itself, first thing after it is forked (chute.execution.worker).
A task whose move fails does not run: its shell exits JOIN_FAILED after JOIN_NOTE in its
log (chute.execution.runner names the group in the Result's error); a group that cannot be made
fails the task's start.

Ending: `cgroup.kill` (Linux 5.14+) SIGKILLs everything in a group and its subgroups at
once, whatever left the process group or cleared its environment; without it the group is
frozen (cgroup.freeze, 5.2+) and each member gets SIGKILL until none is left. A SIGTERM
before that goes to each member through a pidfd, after /proc says the pid still names a
member: a recycled pid is never hit.
Crash safety: nothing durable: groups, like processes, are gone after a reboot. An owner
records its group's path (chute.execution.owners) before making it, so a restart finds it.
Diagnostics: where no group can be made (no cgroup2 mount, no write access: under
systemd, Delegate=yes) `setup` returns the reason, which the daemon logs once at start;
tasks are then fenced as before (process groups, the subreaper, the task cookie).
Leftovers: `owner_groups` lists a spool's owner groups; chute.execution.owners decides which
owner is dead and chute.execution.leftovers ends them (`signal_members`, `kill`,
`wait_empty`, `remove_tree`).
Limits: call: tasks share their owner's pool group (a worker runs many calls): nothing
per call: task. A limit per task (memory, pids) goes into the group between
OwnerGroup.task() and the spawn (both in the spawner thread, chute.execution.local); the controllers
here are cgroup v1 (memory, pids at /sys/fs/cgroup/<name>), which need groups of their own
in those hierarchies, named like these. Without cgroup.kill, killing a group waits (at
most EMPTY_WAIT) on the caller's thread.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chute.execution import procfs

log = logging.getLogger(__name__)

JOIN_FAILED = 125
JOIN_NOTE = "chute: the task could not join its cgroup, so it did not run"
SPOOL_PREFIX = "chute-"
DAEMON = "daemon"  # the daemon's owner group, and the leaf a daemon moves itself into
FOREGROUND_PREFIX = "foreground-"
TASK_PREFIX = "t-"
POOL = "pool"
EMPTY_WAIT = 5.0  # seconds a killed group gets to empty before it is left for later
POLL = 0.01  # seconds between looks at a group that is emptying
_OWNER_NAME = re.compile(r"(daemon|foreground-\d{8}_\d{6}_[0-9a-f]{6})")
_SPOOL_NAME = re.compile(r"chute-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """The cgroup v2 hierarchy as this process sees it."""

    mount: Path  # where it is mounted
    root: str  # the mount's root within the hierarchy ("/" unless a subgroup is mounted)

    def path_of(self, cgroup: str) -> Path | None:
        """The folder of a group named as /proc/<pid>/cgroup names it ("/a/b")."""
        if self.root != "/":
            if cgroup != self.root and not cgroup.startswith(self.root + "/"):
                return None
            cgroup = cgroup[len(self.root) :]
        return self.mount / cgroup.lstrip("/")

    def group_of(self, pid: int | str) -> Path | None:
        """The folder of the group process `pid` is in, or None (gone, or outside the mount)."""
        cgroup = procfs.cgroup_of(pid)
        return None if cgroup is None else self.path_of(cgroup)

    def holds(self, group: Path, pid: int) -> bool:
        """Whether process `pid` is in `group` or one of its subgroups."""
        path = self.group_of(pid)
        return path is not None and (path == group or group in path.parents)

    def within(self, path: Path) -> bool:
        """Whether `path` names a group below the mount (a path read from a file is checked
        before it is touched)."""
        return path.is_absolute() and ".." not in path.parts and self.mount in path.parents


@functools.cache
def hierarchy() -> Hierarchy | None:
    """The first cgroup2 mount in /proc/self/mountinfo, or None."""
    found = procfs.mount_of("cgroup2")
    return None if found is None else Hierarchy(mount=Path(found[0]), root=found[1])


def spool_group(spool_root: Path) -> str:
    """`chute-<12 hex>`: the name of a spool's group, from its real path."""
    digest = hashlib.sha256(os.path.realpath(spool_root).encode()).hexdigest()
    return f"{SPOOL_PREFIX}{digest[:12]}"


def group_name(key: str) -> str:
    """A task key as a folder name: `/` becomes `+`, other odd characters %XX."""
    out = []
    for ch in key:
        if ch.isascii() and (ch.isalnum() or ch in "._-#"):
            out.append(ch)
        elif ch == "/":
            out.append("+")
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    return TASK_PREFIX + "".join(out)[:240]


def is_owner_group(path: Path) -> bool:
    """Whether `path` has the form <…>/chute-<spool id>/<owner> (checked before a path read
    from a file is ended)."""
    return bool(_OWNER_NAME.fullmatch(path.name) and _SPOOL_NAME.fullmatch(path.parent.name))


def base(*, leaf: bool) -> Path | None:
    """The group this process's chute groups go under: its own, or for a daemon (`leaf`)
    already in its leaf, that leaf's parent. None without a v2 hierarchy."""
    hier = hierarchy()
    if hier is None:
        return None
    cgroup = procfs.cgroup_of()
    own = None if cgroup is None else hier.path_of(cgroup)
    if own is not None and leaf and own.name == DAEMON and own != hier.mount:
        own = own.parent
    return own


def owner_groups(spool_root: Path, *, leaf: bool) -> dict[str, Path]:
    """The owner groups of a spool under this process's base (see `base`), by owner name:
    what a restart looks at for leftovers (chute.execution.owners decides whose owner is dead)."""
    here = base(leaf=leaf)
    if here is None:
        return {}
    try:
        with os.scandir(here / spool_group(spool_root)) as listing:
            entries = list(listing)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {
        e.name: Path(e.path)
        for e in entries
        if e.is_dir(follow_symlinks=False) and _OWNER_NAME.fullmatch(e.name)
    }


# -- one group --------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def populated(group: Path) -> bool:
    """Whether a process is left in `group` or its subgroups (zombies do not count)."""
    raw = procfs.read(group / "cgroup.events")
    return raw is not None and b"populated 1" in raw


def members(group: Path) -> list[int]:
    """Pids in `group` and its subgroups, as cgroup.procs lists them now."""
    pids: list[int] = []
    for folder, _, _ in os.walk(group):
        raw = procfs.read(Path(folder) / "cgroup.procs")
        if raw:
            pids.extend(int(pid) for pid in raw.split())
    return pids


def signal_members(group: Path, sig: int) -> int:
    """`sig` to each process in `group` and its subgroups, through a pidfd opened before /proc
    said the pid is a member (so never a recycled pid); returns how many got it."""
    hier = hierarchy()
    if hier is None:
        return 0
    sent = 0
    for pid in members(group):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue  # gone already
        try:
            if hier.holds(group, pid) and not procfs.exited(pidfd):
                signal.pidfd_send_signal(pidfd, sig)
                sent += 1
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    return sent


def kill(group: Path) -> None:
    """SIGKILL everything in `group` and its subgroups: cgroup.kill, else freeze and kill."""
    try:
        _write(group / "cgroup.kill", b"1")
        return
    except FileNotFoundError:
        if not group.is_dir():
            return  # removed already: nothing is in it
    # Before Linux 5.14: frozen, a member can neither fork nor exit by itself, so a pass of
    # SIGKILL (to which a frozen process is not immune) reaches all of them.
    try:
        _write(group / "cgroup.freeze", b"1")
    except FileNotFoundError:
        return
    deadline = time.monotonic() + EMPTY_WAIT
    while populated(group) and time.monotonic() < deadline:
        signal_members(group, signal.SIGKILL)
        time.sleep(POLL)
    with contextlib.suppress(OSError):
        _write(group / "cgroup.freeze", b"0")


def wait_empty(groups: list[Path], deadline: float) -> bool:
    """Wait until no process is left in any of `groups` (True), or until `deadline`
    (time.monotonic) passes (False)."""
    while any(populated(g) for g in groups):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def remove(group: Path) -> bool:
    """rmdir `group`; False while a process (or a subgroup) is still in it."""
    try:
        os.rmdir(group)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return True


def remove_tree(group: Path) -> bool:
    """Remove `group` and its subgroups, deepest first; False when one still has processes."""
    done = True
    for folder, _, _ in os.walk(group, topdown=False):
        try:
            done = remove(Path(folder)) and done
        except OSError as exc:
            log.error("cannot remove cgroup %s: %s", folder, exc.strerror)
            done = False
    return done


# -- an owner's groups ------------------------------------------------------------------


class OwnerGroup:
    """The groups of one owner (the daemon, or one `chute run`) on one spool."""

    def __init__(self, path: Path):
        self.path = path
        self.pool = path / POOL

    def task(self, key: str) -> Path:
        """Make the group of task `key` (a leftover of the same key is reused); OSError says
        why not."""
        path = self.path / group_name(key)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        return path

    def close(self) -> None:
        """Kill what is left in the owner's groups and remove them, and the spool's group when
        no other owner has one there: the owner has ended its tasks."""
        if populated(self.path):
            kill(self.path)
            wait_empty([self.path], time.monotonic() + EMPTY_WAIT)
        if not remove_tree(self.path):
            log.error("cgroup %s still holds processes after SIGKILL; leaving it", self.path)
            return
        with contextlib.suppress(OSError):  # another owner's group is still in it
            os.rmdir(self.path.parent)


def setup(
    spool_root: Path, owner: str, *, leaf: bool, note: Callable[[Path], None]
) -> OwnerGroup | str:
    """Make the owner's group (and its pool group), or say why there can be none.

    `note(path)` is called before the group is made (the owner records it: chute.execution.owners).
    With `leaf` (the daemon), a process outside the root group first moves itself into the
    leaf <base>/daemon, beside the groups it makes.
    """
    hier = hierarchy()
    if hier is None:
        return "no cgroup v2 hierarchy is mounted (/proc/self/mountinfo)"
    here = base(leaf=leaf)
    if here is None:
        return f"this process's cgroup ({procfs.cgroup_of()}) is not under {hier.mount}"
    if leaf and here != hier.mount and hier.group_of("self") != here / DAEMON:
        try:
            (here / DAEMON).mkdir(exist_ok=True)
            _write(here / DAEMON / "cgroup.procs", b"0")
        except OSError as exc:
            return _cannot("move the daemon into", here / DAEMON, exc)
    path = here / spool_group(spool_root) / owner
    note(path)
    for attempt in range(3):
        try:
            path.parent.mkdir(exist_ok=True)
            path.mkdir(exist_ok=True)
            (path / POOL).mkdir(exist_ok=True)
            break
        except FileNotFoundError as exc:  # the last other owner removed the spool's group
            if attempt == 2:
                return _cannot("make", path, exc)
        except OSError as exc:
            return _cannot("make", path, exc)
    if not (path / "cgroup.kill").exists() and not (path / "cgroup.freeze").exists():
        remove_tree(path)
        return f"{path} has neither cgroup.kill (Linux 5.14) nor cgroup.freeze (Linux 5.2)"
    return OwnerGroup(path)


def _cannot(what: str, path: Path, exc: OSError) -> str:
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = " (under systemd, Delegate=yes gives the service a cgroup subtree of its own)"
    return f"cannot {what} {path}: {exc.strerror}{hint}"


def join_argv(
    group: Path, command: str | tuple[str, ...] | list[str], pwd: str | None = None
) -> list[str]:
    """The argv that moves the new process into `group`, then runs `command` (a string for
    /bin/sh -c, or an argv), or exits JOIN_FAILED after JOIN_NOTE without running it.

    An argv command gets the environment it was given: the shell's own PWD is removed, or
    set back to `pwd` (the task's PWD, when its environment has one)."""
    procs = str(group / "cgroup.procs")
    fail = f"{{ echo '{JOIN_NOTE}' >&2; exit {JOIN_FAILED}; }}"
    if isinstance(command, str):
        return ["/bin/sh", "-c", f"echo 0 >{_quote(procs)} || {fail}; {command}"]
    env = "unset PWD" if pwd is None else f"PWD={_quote(pwd)}; export PWD"
    return ["/bin/sh", "-c", f'echo 0 >"$0" || {fail}; {env}; exec "$@"', procs, *command]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
