"""Scenarios 3 and 4: a flood that overflows inotify, and files written slowly in place."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from conftest import wait_for
from daemon_proc import Daemon, daemon_factory, final_run, job, runs_of

__all__ = ["daemon_factory"]

FLOOD = int(os.environ.get("CHUTE_FLOOD_FILES", "20000"))
RSS_LIMIT = 200 << 20


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_flood_of_files_at_once_overflows_inotify_and_every_file_runs(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    limit = Path("/proc/sys/fs/inotify/max_queued_events")
    saved = limit.read_text() if os.geteuid() == 0 else None
    if saved is not None:  # a small queue, fixed when the daemon's inotify is made: overflow
        limit.write_text("1024\n")
    try:
        d = daemon_factory(
            "cpus: 2\nrescan_interval: 2s\nretention: {keep_runs: 1000000}\n"
        ).start()
    finally:
        if saved is not None:
            limit.write_text(saved)
    assert d.proc is not None
    daemon = psutil.Process(d.proc.pid)
    incoming = spool / "incoming"
    staging = spool / "staging"  # same filesystem, outside the daemon's view
    staging.mkdir()
    for i in range(FLOOD):
        (staging / f"j{i:05d}.yaml").write_text(job(f"j{i:05d}", "true"))
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, daemon.memory_info().rss)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for i in range(FLOOD):  # as fast as renames go: far faster than the daemon drains
            os.rename(staging / f"j{i:05d}.yaml", incoming / f"j{i:05d}.yaml")

        def drained() -> bool:
            return not any(incoming.iterdir()) and not any((spool / "queue").iterdir())

        wait_for(f"{FLOOD} files run", drained, timeout=1400)
    finally:
        stop.set()
        sampler.join()
    assert d.stop() == 0
    recs = runs_of(spool)
    assert len(recs) == FLOOD
    assert {r["state"] for r in recs} == {"succeeded"}
    assert len({r["trigger"]["source"] for r in recs}) == FLOOD
    print(f"{FLOOD} files, peak RSS {peak / 2**20:.0f} MiB; log: {_overflowed(d)}")
    assert peak < RSS_LIMIT
    if saved is not None:
        assert _overflowed(d) == "inotify overflowed"


def _overflowed(d: Daemon) -> str:
    text = d.log.read_text()
    return "inotify overflowed" if "inotify queue overflowed" in text else "no overflow seen"


def test_a_file_written_slowly_in_place_is_never_read_half_written(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory().start()
    text = job("slowpoke", "echo done") + "  timeout: 1m\n" + "  env: {A: '1'}\n"
    half = len(text) // 2
    path = spool / "incoming" / "slowpoke.yaml"
    with open(path, "w") as f:  # no dot-temp name: written where the daemon looks
        f.write(text[:half])
        f.flush()
        os.fsync(f.fileno())
        time.sleep(1.0)  # the scenario: a writer that pauses with the file half written
        assert not list((spool / "rejected").glob("*.error.json"))
        f.write(text[half:])
    rec = final_run(spool, "incoming/slowpoke.yaml")
    assert rec["state"] == "succeeded"
    assert (spool / "runs" / rec["run_id"] / "spec.yaml").read_text() == text
    assert list((spool / "rejected").iterdir()) == []
    assert d.stop() == 0


def test_a_file_held_open_for_writing_is_taken_only_after_close(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("rescan_interval: 1s\n").start()
    path = spool / "incoming" / "held.yaml"
    f = open(path, "w")  # noqa: SIM115 - the scenario is the open descriptor
    try:
        f.write(job("held", "true"))
        f.flush()
        deadline = time.monotonic() + 2.5  # more than two rescans
        while time.monotonic() < deadline:
            assert path.exists(), "taken while still open for writing"
            time.sleep(0.1)
    finally:
        f.close()
    assert final_run(spool, "incoming/held.yaml")["state"] == "succeeded"
    assert d.stop() == 0
