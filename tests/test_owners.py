"""Owners and their leftovers with real processes and lock files (no daemon): a dead
owner's recorded processes are ended, a recycled pid is not, a live owner's lock holds,
and a dead foreground run is interrupted once."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import orjson
import pytest

from chute.execution import leftovers, owners
from chute.store.spool import Spool
from conftest import load_json, pid_alive, wait_for

RUN_ID = "20261201_120000_abcdef"


@pytest.fixture
def root(tmp_path: Path) -> Spool:
    s = Spool(root=tmp_path / "spool", runs=tmp_path / "spool" / "runs")
    s.ensure()
    return s


def started(pid: int) -> float:
    """The boot-clock time /proc gives for the process's start."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rindex(b")") + 2 :].split()[19]) / os.sysconf("SC_CLK_TCK")


def test_a_dead_daemons_recorded_groups_and_workers_are_ended_and_a_recycled_pid_is_not(
    root: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    leader = subprocess.Popen(["/bin/sh", "-c", "sleep 300 & wait"], start_new_session=True)
    worker = subprocess.Popen(["sleep", "300"])
    stranger = subprocess.Popen(["sleep", "300"])  # its pid stands for a recycled one
    try:
        (root.state / "tasks.log").write_text(
            f"{leader.pid} {started(leader.pid):.3f} {RUN_ID}/stage\n"
            f"worker {worker.pid} {started(worker.pid):.3f}\n"
            f"worker {stranger.pid} {started(stranger.pid) - 100:.3f}\n"
            "1234 cut by the cr"
        )

        def group() -> list[int]:
            done = subprocess.run(["pgrep", "-g", str(leader.pid)], capture_output=True)
            return [int(p) for p in done.stdout.split()]

        members = wait_for("the leader's background sleep", lambda: len(group()) == 2 and group())
        with caplog.at_level(logging.WARNING):
            leftovers.end_leftovers(root, grace=1.0)
        assert leader.wait(timeout=5) == -15
        assert worker.wait(timeout=5) == -15
        assert not any(pid_alive(p) for p in members)
        assert pid_alive(stranger.pid)
        assert caplog.messages == [
            f"killing 2 process(es) left by a previous daemon: {sorted([leader.pid, worker.pid])}"
        ]
    finally:
        for p in (leader, worker, stranger):
            p.kill()
            p.wait()


def test_a_live_foreground_owner_is_left_alone_and_its_lock_goes_with_it(root: Spool) -> None:
    owner = owners.start_foreground(root, RUN_ID)
    try:
        lock = root.state / "foreground" / RUN_ID
        assert lock.read_text().startswith(f"owner {os.getpid()} ")
        assert [p.name for p in lock.parent.iterdir()] == [RUN_ID]  # no temp name left
        assert leftovers.end_dead_foreground(root, grace=1.0) == []
        assert lock.exists()
    finally:
        if owner.cgroup is not None:
            owner.cgroup.close()
        owner.release()
    assert not lock.exists()


def test_a_dead_foreground_run_is_interrupted_once_and_a_final_one_is_left_as_it_is(
    root: Spool,
) -> None:
    done_id = "20261201_120000_bbbbbb"
    for run_id, state in ((RUN_ID, "running"), (done_id, "succeeded")):
        (root.runs / run_id).mkdir()
        (root.runs / run_id / "run.json").write_bytes(
            orjson.dumps({"run_id": run_id, "state": state, "trigger": {"type": "run"}})
        )
        (root.state / "foreground").mkdir(exist_ok=True)
        (root.state / "foreground" / run_id).write_text("owner 4242 10.0\n")  # nobody holds it
    assert leftovers.end_dead_foreground(root, grace=1.0) == [RUN_ID]
    rec = load_json(root.runs / RUN_ID / "run.json")
    assert rec["state"] == "interrupted"
    assert rec["error"] == (
        "the `chute run` process (pid 4242) that ran it ended before the run did; a foreground "
        f"run is not resumed (`chute retry {RUN_ID}` makes a new run from it)"
    )
    assert load_json(root.runs / done_id / "run.json")["state"] == "succeeded"
    assert list((root.state / "foreground").iterdir()) == []
    assert leftovers.end_dead_foreground(root, grace=1.0) == []
