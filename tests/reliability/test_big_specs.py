"""Big valid specs dropped at once do not stop the loop: the watchdog keeps being pinged and
a task's deadline is kept, while every file is validated and run."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, job, runs_of

__all__ = ["daemon_factory"]

FILES = 64


def big_spec(i: int) -> str:
    """A valid Job of about 1 MiB: thousands of env variables, each a short string."""
    env = "".join(f"    V{k:05d}: '{'x' * 50}'\n" for k in range(15_500))
    return job(f"big{i}", "true", f"  env:\n{env}")


def watch_pings(sock: socket.socket, deadline: float) -> list[float]:
    stamps: list[float] = []
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            continue
        if b"WATCHDOG=1" in data:
            stamps.append(time.monotonic())
    return stamps


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sixty_four_one_mib_specs_keep_the_watchdog_and_deadlines(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    text = big_spec(0)
    assert 900_000 < len(text.encode()) < 1 << 20
    d = daemon_factory("cpus: 2\n", env={"WATCHDOG_USEC": "1000000"}).start()  # a ping / 0.5 s
    drop(spool, "deadline.yaml", job("deadline", "sleep 60", "  timeout: 3s\n"))
    wait_for("the timed task to start", lambda: runs_of(spool, "incoming/deadline.yaml"))
    for i in range(FILES):
        drop(spool, f"big{i:02d}.yaml", big_spec(i))
    started = time.monotonic()
    d.messages.clear()
    stamps: list[float] = []

    def all_done() -> bool:
        stamps.extend(watch_pings(d.sock, time.monotonic() + 1.0))
        done = [r for r in runs_of(spool) if r["state"] == "succeeded"]
        return len(done) == FILES

    wait_for("every big spec to run", all_done, timeout=500)
    took = time.monotonic() - started
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < 2.0, f"longest gap between WATCHDOG=1 pings {max(gaps):.2f}s"
    timed = final_run(spool, "incoming/deadline.yaml")
    assert timed["state"] == "failed"
    assert "timed out after 3s" in timed["error"]
    took_task = timed["duration_seconds"]
    assert took_task < 3.0 + 1.0, took_task  # `sleep` ends on TERM: within 1 s of its deadline
    assert d.stop() == 0
    print(
        f"{FILES} specs of {len(text) >> 10} KiB in {took:.0f}s; longest ping gap {max(gaps):.2f}s"
    )
