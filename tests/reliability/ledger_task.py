"""A task of the kill -9 storm and the soak: it appends what it does to a ledger.

A `run:` stage runs it as `python -S ledger_task.py LEDGER TAG FLAGS`; a `call:` stage calls
`ledger_task:call` (the storm copies this file into its tmp folder, on the stage's
PYTHONPATH). Standard library only, and quick to start: it runs thousands of times.

Each ledger line is one write(2) on an O_APPEND descriptor, so lines never interleave:

    <run_id> <stage> <n> <event> <tag> <pid> <pstart> <wall> <owner>

`stage` is `<stage>/<shard>`; `n` counts the starts of that stage (and shard) of that run,
this one included; `pid`/`pstart` (start time in clock ticks since boot) name the process
the line is about; `wall` is time.time(); `owner` is the pid of the chute process (daemon,
or `chute run`/`retry`) the task descends from, 0 if it is gone already. Events: `start`,
`end` (it did its work and returns 0), `fail` (it exits non-zero on purpose), `child` (a
process it started; the pid is the child's), and `overlap` (at its start another process of
the same stage of the same run, or of the same `group` in another run, was alive: its pid is
on the line).

FLAGS (comma separated): `sleep=S` works for S seconds; `gate=PATH` works until PATH
exists; `ignore_term` ignores SIGTERM (so a cancel needs SIGKILL); `child` and
`setsid_child` start a `sleep 300` (the second in a session of its own), killed at the
task's normal end, so one found alive afterwards was left by a task chute ended;
`fail_first` exits 75 on the first start of the stage; `fail` always exits 3;
`group=NAME` also looks for live tasks of NAME in other runs (an `overlap: skip` schedule).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time

SLEEP = "/bin/sleep"


def _pstart(pid: int) -> int | None:
    """Start time of a live process (clock ticks since boot), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _owner() -> int:
    """The nearest ancestor that runs chute (`python -m chute ...`); 0 when the chain is
    broken (the owner died and this process was reparented)."""
    pid = os.getppid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"\0-m\0chute\0" in f.read():
                    return pid
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            return 0
        pid = int(raw[raw.rindex(b")") + 2 :].split()[1])
    return 0


class _Line:
    def __init__(self, ledger: str, run_id: str, stage: str, tag: str) -> None:
        self.fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.run_id, self.stage, self.tag = run_id, stage, tag
        self.n = 0
        self.owner = _owner()

    def put(self, event: str, pid: int, pstart: int | None) -> None:
        text = (
            f"{self.run_id} {self.stage} {self.n} {event} {self.tag} {pid} {pstart} "
            f"{time.time():.6f} {self.owner}\n"
        )
        os.write(self.fd, text.encode())

    def close(self) -> None:
        os.close(self.fd)


def _live(
    path: str, me: tuple[int, int | None], run_id: str, other_runs: bool
) -> tuple[int, list[int]]:
    """Add this process to the live file `path` under its lock; (how many were listed
    before, pids listed that still live: of any run, or of other runs only)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        chunks = []
        while chunk := os.pread(fd, 1 << 20, sum(map(len, chunks))):
            chunks.append(chunk)
        listed = b"".join(chunks).decode().splitlines()
        alive = []
        for line in listed:
            pid, pstart, run = line.split()
            if (other_runs and run == run_id) or (int(pid), int(pstart)) == me:
                continue  # a worker runs many calls: its own earlier ones are over
            if _pstart(int(pid)) == int(pstart):
                alive.append(int(pid))
        os.write(fd, f"{me[0]} {me[1]} {run_id}\n".encode())
        return len(listed), alive
    finally:
        os.close(fd)


def work(ledger: str, run_id: str, stage: str, tag: str, flags: str) -> int:
    """Do what FLAGS say, writing the ledger; the exit code."""
    opts = dict(f.partition("=")[::2] for f in flags.split(",") if f)
    me = (os.getpid(), _pstart(os.getpid()))
    line = _Line(ledger, run_id, stage, tag)
    live_dir = ledger + ".live"
    os.makedirs(live_dir, exist_ok=True)
    before, alive = _live(
        os.path.join(live_dir, f"{run_id}.{stage.replace('/', '.')}"), me, run_id, False
    )
    line.n = before + 1
    if "group" in opts:
        alive += _live(os.path.join(live_dir, f"group.{opts['group']}"), me, run_id, True)[1]
    line.put("start", *me)
    for pid in alive:
        line.put("overlap", pid, _pstart(pid))
    if "ignore_term" in opts:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = None
    if "child" in opts or "setsid_child" in opts:
        attrs = {"setsid": True} if "setsid_child" in opts else {}
        child = os.posix_spawn(SLEEP, [SLEEP, "300"], dict(os.environ), **attrs)
        line.put("child", child, _pstart(child))
    try:
        if "gate" in opts:
            while not os.path.exists(opts["gate"]):
                time.sleep(0.1)
        else:
            time.sleep(float(opts.get("sleep", "0")))
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    code = 3 if "fail" in opts else 75 if "fail_first" in opts and line.n == 1 else 0
    line.put("end" if code == 0 else "fail", *me)
    line.close()
    return code


def call(ledger: str, tag: str, flags: str, ctx: object) -> dict[str, int]:
    """A `call:` stage. A failure it is asked for raises (the call fails)."""
    stage = f"{ctx.stage}/{ctx.shard_index}"  # type: ignore[attr-defined]
    code = work(ledger, ctx.run_id, stage, tag, flags)  # type: ignore[attr-defined]
    if code != 0:
        raise RuntimeError(f"failing on purpose (exit code {code})")
    return {"pid": os.getpid()}


if __name__ == "__main__":
    env = os.environ
    where = f"{env['CHUTE_STAGE']}/{env['CHUTE_SHARD_INDEX']}"
    sys.exit(work(sys.argv[1], env["CHUTE_RUN_ID"], where, sys.argv[2], sys.argv[3]))
