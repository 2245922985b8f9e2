"""Scenario 7: signals under load and clocks that jump.

This machine has 2 cores, so at most 2 tasks run at once (the allocator pins each to a core
of its own); "8 tasks" are 8 runs in flight: 2 running, 6 waiting, at the SIGTERM.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from chute.clock import Clock
from chute.execution.executor import Task
from conftest import wait_for
from daemon_proc import Daemon, assert_settled, daemon_factory, drop, final_run, job, runs_of
from fixtures_procs import PolledExecutor

__all__ = ["daemon_factory"]


@pytest.mark.slow
def test_sigterm_with_eight_runs_in_flight_interrupts_them_and_a_restart_finishes_all(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    config = "cpus: 2\nstop_timeout: 500ms\nkill_grace: 500ms\n"
    d = daemon_factory(config).start()
    for i in range(8):
        drop(spool, f"t{i}.yaml", job(f"t{i}", f"test -e {gate} || sleep 1000"))
    wait_for("two running", lambda: sum(r["state"] == "running" for r in runs_of(spool)) == 2)
    wait_for("all eight accepted", lambda: len(runs_of(spool)) == 8)
    assert d.stop() == 0
    states = sorted(r["state"] for r in runs_of(spool))
    assert states == ["queued"] * 6 + ["stopped"] * 2
    assert len(list((spool / "queue").iterdir())) == 8
    gate.touch()
    d2 = daemon_factory(config).start()
    for i in range(8):
        rec = final_run(spool, f"incoming/t{i}.yaml")
        assert rec["state"] == "succeeded"
        assert_settled(spool / "runs" / rec["run_id"])
    resumed = sorted(r.get("recoveries", 0) for r in runs_of(spool))
    assert resumed == [0] * 6 + [1] * 2
    assert d2.stop() == 0


def test_sighup_under_load_loses_nothing(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("cpus: 2\n").start()
    assert d.proc is not None
    for i in range(40):
        drop(spool, f"h{i}.yaml", job(f"h{i}", "sleep 0.05"))
        if i % 4 == 0:
            d.proc.send_signal(signal.SIGHUP)
    for i in range(40):
        assert final_run(spool, f"incoming/h{i}.yaml")["state"] == "succeeded"
    d.receive()
    assert d.messages.count("RELOADING=1") >= 1
    assert d.stop() == 0


class JumpingClock(Clock):
    """Wall time jumps an hour forward, then two back; the monotonic clock does not."""

    def __init__(self) -> None:
        self.calls = 0

    def time(self) -> float:
        self.calls += 1
        jump = 3600.0 if self.calls % 3 == 1 else -7200.0 if self.calls % 3 == 2 else 0.0
        return time.time() + jump


def test_timeouts_follow_the_monotonic_clock_whatever_the_wall_clock_does(
    tmp_path: Path,
) -> None:
    ex = PolledExecutor(kill_grace=0.5, max_workers=1, clock=JumpingClock())
    try:
        start = time.monotonic()
        ex.start(
            Task(
                key="r/sleepy",
                kind="run",
                cores=(),
                log_path=str(tmp_path / "log"),
                output_path=str(tmp_path / "out.json"),
                env={"PATH": "/usr/bin:/bin"},
                timeout=0.5,
                command=("sleep", "30"),
            )
        )
        results = []
        while not results:
            results = ex.poll(5)
        elapsed = time.monotonic() - start
    finally:
        ex.close()
    assert results[0].timed_out
    assert 0.4 < elapsed < 3.0
