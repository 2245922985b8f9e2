"""Scenario 1: kill -9 the daemon at random moments while files are dropped and run.

Pass: after the last restart every dropped file is accounted for exactly once (one run, or
one rejection), every run.json parses and is final, and no stage that finished ran again
(a stage's dependent never starts before the stage's last start, and each run keeps its id).

The storm does the same over every operation (tests/reliability/storm.py has its checks):
drops, retries (with and without --from), cancels of queued and running runs (a task that
ignores TERM, a call), `chute gc` and the daemon's retention with a small keep_runs,
`every: 1s` schedules with each overlap policy, `at` schedules, unschedules, and call:
stages, while the daemon is killed with SIGKILL, or at a crash point, every 0.3-6 s.
CHUTE_TEST_SEED reproduces a run's operations and kill timing (not the machine's timing).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from conftest import wait_for
from daemon_proc import Daemon, assert_settled, daemon_factory, drop
from reliability.storm import (
    CRASH_POINTS,
    GATED,
    TASK,
    Busy,
    Storm,
    check,
    read_ledger,
    running,
)

__all__ = ["daemon_factory"]

FILES = 1000
KILLS = 20


def spec(i: int, ledger: Path) -> str:
    if i % 25 == 7:  # some bad files among the good: they must be rejected exactly once
        return f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: bad{i}}}\nspec:\n  cpus: 1\n"
    line = ledger / f"f{i:04d}"
    return (
        f"apiVersion: chute/v1\nkind: Pipeline\nmetadata: {{name: p{i}}}\nspec:\n  stages:\n"
        f"    - {{name: first, run: 'echo first $CHUTE_RUN_ID >> {line}'}}\n"
        f"    - {{name: second, dependsOn: [first], run: 'echo second $CHUTE_RUN_ID >> {line}'}}\n"
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_at_random_moments_loses_nothing_and_runs_nothing_twice(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    seed = int(os.environ.get("CHUTE_TEST_SEED", time.time_ns() % 100_000))
    print(f"seed {seed} (CHUTE_TEST_SEED reproduces the drop and kill timing)")
    rng = random.Random(seed)
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    (spool / "incoming").mkdir(parents=True)
    gaps = [rng.uniform(0.0, 0.03) for _ in range(FILES)]

    def dropper() -> None:
        for i in range(FILES):
            drop(spool, f"f{i:04d}.yaml", spec(i, ledger))
            time.sleep(gaps[i])

    thread = threading.Thread(target=dropper)
    d = daemon_factory("cpus: 2\nkill_grace: 1s\n").start()
    thread.start()
    kills = 0
    try:
        while kills < KILLS or thread.is_alive():
            time.sleep(rng.uniform(0.05, 0.8))
            d.stop(signal.SIGKILL)
            kills += 1
            d = daemon_factory("cpus: 2\nkill_grace: 1s\n").start()
    finally:
        thread.join()

    def settled() -> bool:
        return not any((spool / "incoming").iterdir()) and not any((spool / "queue").iterdir())

    wait_for("every file taken and every run finished", settled, timeout=300)
    assert d.stop() == 0

    runs: dict[str, list[dict[str, object]]] = {}
    for folder in (spool / "runs").iterdir():
        if folder.is_symlink() or folder.name.startswith("."):
            continue
        rec = orjson.loads((folder / "run.json").read_bytes())  # every run.json parses
        orjson.loads((folder / "manifest.json").read_bytes())
        assert_settled(folder)
        runs.setdefault(str(rec["trigger"]["source"]), []).append(rec)
    rejected = {p.name[: -len(".error.json")] for p in (spool / "rejected").glob("*.error.json")}
    for i in range(FILES):
        name = f"f{i:04d}.yaml"
        made = runs.get(f"incoming/{name}", [])
        if i % 25 == 7:
            assert made == [], name
            assert name in rejected, name
            continue
        assert name not in rejected, name
        assert len(made) == 1, f"{name}: {len(made)} runs"
        rec = made[0]
        assert rec["state"] == "succeeded", (name, rec)
        lines = (ledger / f"f{i:04d}").read_text().split("\n")[:-1]
        assert {x.split()[1] for x in lines} == {rec["run_id"]}, (name, lines)
        stages = [x.split()[0] for x in lines]
        last_first = max(n for n, s in enumerate(stages) if s == "first")
        first_second = min(n for n, s in enumerate(stages) if s == "second")
        assert last_first < first_second, (name, stages)
    assert kills >= KILLS
    recovered = sum(1 for recs in runs.values() for r in recs if r.get("recoveries"))
    print(f"{kills} kills, {len(runs)} runs, {len(rejected)} rejections, {recovered} resumed")


# -- the storm over every operation -------------------------------------------------------------

STORM_CONFIG = (
    "cpus: 2\nkill_grace: 1s\nstop_timeout: 2s\nretention: {keep_runs: 15, max_age: 30d}\n"
)
STORM_SECONDS = float(os.environ.get("CHUTE_STORM_SECONDS", 120))  # of operations, then settle
DROP_KINDS = {"chain": 35, "flaky": 20, "broken": 10, "blocker": 10, "queued": 8, "bad": 12}


def storm_operations(storm: Storm, seconds: float, rng: random.Random) -> None:
    """Drops, cancels, retries and gc at random; every-schedules, then their unschedules;
    `at` schedules spread over the time; at the end every gated run is cancelled."""
    began = time.monotonic()
    for overlap, kind in (("skip", "sk"), ("queue", "qu"), ("allow", "al")):
        storm.schedule(kind, f"{{every: 1s, overlap: {overlap}}}")
    for _ in range(6):
        storm.schedule_at(rng.uniform(3, seconds))
    unschedule_at = {0.4: "al", 0.6: "qu", 0.8: "sk"}
    while (elapsed := time.monotonic() - began) < seconds:
        for share, kind in list(unschedule_at.items()):
            if elapsed >= share * seconds:
                del unschedule_at[share]
                storm.unschedule(next(t for t, k in storm.schedules.items() if k == kind))
        storm.act(rng, {"drop": 0.5, "cancel": 0.22, "retry": 0.23, "gc": 0.05}, DROP_KINDS)
        time.sleep(rng.uniform(0.1, 0.6))
    for kind in unschedule_at.values():
        storm.unschedule(next(t for t, k in storm.schedules.items() if k == kind))
    gated = [t for t, d in storm.drops.items() if d.kind in GATED]
    wait_for("a run for every gated drop", lambda: all(storm.run_of(t) for t in gated), 120)
    while storm.cancel_some():
        pass
    storm.wait_asks()
    storm.gate.touch()  # a cancel that was lost lets its run succeed: the check says so


def killed(storm: Storm) -> int:
    """The daemon lives that ended by SIGKILL: the storm's, or a crash point's."""
    return sum(1 for life in storm.lives if life.how.startswith(("killed", "crashed at")))


def kill_at_random(storm: Storm, busy: threading.Thread, rng: random.Random) -> None:
    """kill -9 the daemon every 0.3-6 s while `busy` runs, and until it was killed KILLS
    times at least (on a loaded machine a start takes seconds: the number of kills, not the
    time, is what the storm promises); a third of the lives are armed at a crash point, and
    each starts 0-0.5 s after the kill."""

    def going() -> bool:
        return busy.is_alive() or killed(storm) < KILLS

    while going():
        deadline = time.monotonic() + rng.uniform(0.3, 6)
        while time.monotonic() < deadline and going() and not storm.crashed():
            time.sleep(0.1)
        storm.kill()
        time.sleep(rng.uniform(0, 0.5))
        point = None
        if rng.random() < 0.33:
            point = rng.choice(CRASH_POINTS)
            point += f":{rng.randint(1, 30 if point == 'loop.attempt_recorded' else 3)}"
        storm.start(crash_at=point)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_storm_over_every_operation_keeps_each_acknowledged_request_once(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    seed = int(os.environ.get("CHUTE_TEST_SEED", time.time_ns() % 100_000))
    print(f"seed {seed} (CHUTE_TEST_SEED reproduces the operations and the kill timing)")
    storm = Storm(spool, tmp_path, daemon_factory, STORM_CONFIG, seed)
    began = time.monotonic()
    with running(storm):
        storm.start()
        busy = Busy(storm_operations, storm, STORM_SECONDS, random.Random(seed))
        busy.start()
        kill_at_random(storm, busy, random.Random(seed + 1))
        busy.join_or_raise()
        ended = time.monotonic()
        storm.kill()  # one last crash with everything in flight
        storm.start()
        storm.wait_settled(240)
        assert storm.stop() == 0
    settled = time.monotonic()
    tally = check(storm)
    print(tally.line())
    print(
        f"operations {ended - began:.0f}s, settling {settled - ended:.0f}s, "
        f"checks {time.monotonic() - settled:.0f}s"
    )
    assert killed(storm) >= KILLS


def test_the_storm_ledger_sees_a_stage_started_while_another_start_of_it_lives(
    tmp_path: Path,
) -> None:
    """The instrument itself: two starts of one stage of one run at once (as a resumed call
    beside its crashed daemon's worker would be) leave an `overlap` line, and so do two runs
    of one `group` (an `overlap: skip` schedule)."""
    ledger = tmp_path / "ledger"

    def task(run_id: str, flags: str) -> subprocess.Popen[bytes]:
        env = {"CHUTE_RUN_ID": run_id, "CHUTE_STAGE": "b", "CHUTE_SHARD_INDEX": "0"}
        argv = [sys.executable, "-S", str(TASK), str(ledger), "chain00001", flags]
        return subprocess.Popen(argv, env=env)

    first = task("20261207_000000_aaaaaa", "sleep=60,group=g")
    try:
        wait_for("the first start", lambda: ledger.exists() and b" start " in ledger.read_bytes())
        same_run = task("20261207_000000_aaaaaa", "sleep=0")
        other_run = task("20261207_000001_bbbbbb", "sleep=0,group=g")
        assert (same_run.wait(timeout=30), other_run.wait(timeout=30)) == (0, 0)
    finally:
        first.kill()
        first.wait()
    lines = [(e.run_id[-1], e.n, e.event, e.pid) for e in read_ledger(ledger)]
    assert sorted(lines) == [
        ("a", 1, "start", first.pid),
        ("a", 2, "end", same_run.pid),
        ("a", 2, "overlap", first.pid),  # the second start of that stage saw the first alive
        ("a", 2, "start", same_run.pid),
        ("b", 1, "end", other_run.pid),
        ("b", 1, "overlap", first.pid),  # another run of the group saw it too
        ("b", 1, "start", other_run.pid),
    ]
