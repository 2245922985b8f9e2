"""Scenario 6: tasks that misbehave. Pass: no process outlives its task's end, the log is
capped with a note, the daemon stays responsive throughout.

Each task runs in the real daemon (a subprocess, default config but for `kill_grace`).
"No process outlives the task" is checked by the cookie every task's environment carries
(CHUTE_TASK_KEY=<run_id>/…, read from /proc/*/environ): none may be left once the run is
final, since the daemon records a task's end only after its processes are gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from chute.clock import parse_rfc3339
from chute.runner import DEFAULT_LOG_LIMIT, cap_note
from conftest import chute_env, load_json, pid_alive, wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, job, runs_of

__all__ = ["daemon_factory"]


def task_processes(run_id: str) -> list[int]:
    """Pids of live processes whose environment carries a task cookie of `run_id`."""
    cookie = f"CHUTE_TASK_KEY={run_id}/".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or not ours to read
            continue
        if any(entry.startswith(cookie) for entry in env.split(b"\0")):
            found.append(int(name))
    return found


def stage_of(spool: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """The one stage of a Job's run, from its manifest."""
    stages: list[dict[str, Any]] = load_json(spool / "runs" / rec["run_id"] / "manifest.json")[
        "stages"
    ]
    assert len(stages) == 1, stages
    return stages[0]


def log_path(spool: Path, rec: dict[str, Any]) -> Path:
    return spool / "runs" / str(rec["run_id"]) / str(stage_of(spool, rec)["log"])


def run_job(spool: Path, name: str, command: str, extra: str = "") -> dict[str, Any]:
    drop(spool, f"{name}.yaml", job(name, command, extra))
    rec = final_run(spool, f"incoming/{name}.yaml", timeout=60)
    assert task_processes(rec["run_id"]) == [], f"processes of {name} outlived its run"
    return rec


def test_setsid_grandchild_does_not_outlive_a_task_that_exits_0(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    pidfile = tmp_path / "escapee.pid"
    script = (
        f"setsid sh -c 'echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; sleep 1000' & "
        f"while [ ! -e {pidfile} ]; do sleep 0.01; done; exit 0"
    )
    rec = run_job(spool, "escape", script)
    assert rec["state"] == "succeeded"
    escapee = int(pidfile.read_text())
    assert not pid_alive(escapee)
    assert d.stop() == 0


def test_task_that_ignores_sigterm_is_killed_at_its_timeout(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    t0 = time.monotonic()
    rec = run_job(spool, "stubborn", "trap '' TERM; sleep 30", "  timeout: 1s\n")
    assert time.monotonic() - t0 < 15
    assert rec["state"] == "failed"
    stage = stage_of(spool, rec)
    assert stage["state"] == "timed_out"
    attempt = stage["attempts"][-1]
    assert (attempt["signal"], attempt["error"]) == (
        9,
        "timed out after 1s (SIGTERM, then SIGKILL after 1s)",
    )
    assert d.stop() == 0


STATUS_CLIENT = """
import contextlib, io, sys, time
from chute import cli
for spool in sys.stdin:
    t0 = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["status", "--spool", spool.strip()])
    print(code, time.monotonic() - t0, flush=True)
"""


class StatusClient:
    """`chute status` as users run it, less the interpreter's start.

    A fresh `python -m chute status` spends 0.6 to 0.9 s on this two-core machine starting
    Python and importing, busy daemon or not; that is the CLI's cost, not the daemon's
    answer, so one process imports the CLI once and runs `cli.main(["status", ...])` per
    request.
    """

    def __init__(self, spool: Path):
        self.spool = spool
        self.proc = subprocess.Popen(
            [sys.executable, "-c", STATUS_CLIENT],
            env=chute_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self) -> tuple[int, float]:
        """(exit code, seconds the status command took)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{self.spool}\n")
        self.proc.stdin.flush()
        code, took = self.proc.stdout.readline().split()
        return int(code), float(took)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@dataclass
class Sample:
    status_seconds: float  # how long `chute status` took to answer
    status_code: int
    status_age: float  # now minus status.json's updated_at
    run_running: bool
    task_processes: int


@pytest.mark.slow
def test_task_writing_a_gigabyte_gets_a_capped_log_and_the_daemon_stays_responsive(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    assert d.proc is not None
    daemon = psutil.Process(d.proc.pid)
    samples: list[Sample] = []
    stop = threading.Event()
    status = StatusClient(spool)

    def sample() -> None:
        # `chute status` reads state/status.json, which the daemon's loop rewrites every
        # second: a stale file or a slow answer means the loop is stuck.
        while not stop.is_set():
            recs = runs_of(spool, "incoming/flood.yaml")
            running = bool(recs) and recs[0]["state"] == "running"
            procs = len(task_processes(recs[0]["run_id"])) if running else 0
            code, took = status.ask()
            st = load_json(spool / "state" / "status.json")
            age = time.time() - parse_rfc3339(st["updated_at"]).timestamp()
            samples.append(Sample(took, code, age, running, procs))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample)
    cpu0 = daemon.cpu_times()
    sampler.start()
    try:
        # the sleep keeps the run going for a few samples after the writer is done
        rec = run_job(spool, "flood", "head -c 1G /dev/zero; sleep 1.5")
    finally:
        stop.set()
        sampler.join()
        status.close()
    cpu1 = daemon.cpu_times()
    assert rec["state"] == "succeeded"
    note = cap_note(DEFAULT_LOG_LIMIT)
    assert note == b"\n--- chute: log capped at 64MiB; the rest of the output was discarded ---\n"
    log = log_path(spool, rec)
    assert log.stat().st_size == DEFAULT_LOG_LIMIT + len(note)
    with open(log, "rb") as f:
        f.seek(DEFAULT_LOG_LIMIT - 1)
        assert f.read() == b"\0" + note
    during = [s for s in samples if s.run_running]
    assert during, f"no sample while the run was running: {samples}"
    assert any(s.task_processes for s in during)  # the cookie scan does see live tasks
    for s in samples:
        assert s.status_code == 0, s
        assert s.status_seconds < 1.0, s
        assert s.status_age < 2.5, s
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    worst = max(s.status_seconds for s in samples)
    print(
        f"daemon cpu {cpu:.2f}s for 1 GiB of output ({len(samples)} status samples, "
        f"slowest {worst:.2f}s, oldest status {max(s.status_age for s in samples):.2f}s)"
    )
    assert d.stop() == 0


def test_task_that_closes_stdout_early_and_writes_to_stderr_succeeds(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    script = "echo out; exec 1>&-; for i in 1 2 3; do echo err$i >&2; sleep 0.2; done"
    rec = run_job(spool, "closer", script)
    assert rec["state"] == "succeeded"
    assert log_path(spool, rec).read_text() == "out\nerr1\nerr2\nerr3\n"
    assert d.stop() == 0


def test_no_task_process_is_left_when_the_daemon_stops_mid_task(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\nstop_timeout: 1s\n").start()
    drop(spool, "busy.yaml", job("busy", "setsid sleep 1000 & sleep 1000"))

    def running() -> str | None:
        recs = runs_of(spool, "incoming/busy.yaml")
        if recs and recs[0]["state"] == "running" and task_processes(recs[0]["run_id"]):
            return str(recs[0]["run_id"])
        return None

    run_id = wait_for("the busy task to run", running, 30)
    assert d.stop() == 0
    assert task_processes(run_id) == []
