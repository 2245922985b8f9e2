"""The daemon in-process, one `step` at a time on a manual clock: schedules' overlap, holds
and misfires, a drain, a reload and control requests, without waiting for real time.

Real parts: a real spool, real run folders, real processes for the tasks; only the clock
is the test's. Between steps the test lets the reactor collect what happened (a task
ended, a file was dropped) with short waits on real events, never a sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chute.clock import Clock
from chute.config import load_config
from chute.daemon import Daemon
from chute.scheduling.schedules import fire_run_id
from chute.store.spool import resolve_spool
from conftest import load_json
from daemon_proc import drop, job, runs_of


class ManualClock(Clock):
    """Wall and monotonic time that move only when the test says so."""

    def __init__(self) -> None:
        self.wall = datetime.now(UTC).replace(microsecond=0)
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def time(self) -> float:
        return self.wall.timestamp()

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def daemon(spool: Path, tmp_path: Path, clock: ManualClock) -> Iterator[Callable[[str], Daemon]]:
    made: list[Daemon] = []

    def make(config: str = "") -> Daemon:
        path = tmp_path / "chute.yaml"
        path.write_text(config + "\nhttp: {listen: '127.0.0.1:0'}\nkill_grace: 500ms\n")
        cfg = load_config(path)
        d = Daemon(resolve_spool(spool, cfg), cfg, str(path), clock=clock)
        assert d.open() is None
        made.append(d)
        return d

    yield make
    for d in made:
        if d.reactor is not None and not d.done:
            d.close()


def turn(d: Daemon, clock: ManualClock, until: Callable[[], object], what: str) -> None:
    """Step `d` at the manual clock's time, letting the reactor collect real events between
    steps, until `until()` holds (at most 30 s of real time)."""
    deadline = time.monotonic() + 30
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"30s of steps without {what}")
        d.step(clock.monotonic())
        d.reactor.wait(0.05)


def gated(name: str, gate: Path, schedule: str) -> str:
    return job(name, f"until [ -e {gate}/$CHUTE_RUN_ID ]; do sleep 0.02; done", schedule)


def states(spool: Path, source: str) -> list[str]:
    """The run.json states of `source`'s runs. A running run's run.json says `running` only
    from its first manifest, MANIFEST_INTERVAL after its start on the (manual) clock: tests
    look at the engine for a start."""
    return [r["state"] for r in runs_of(spool, source)]


def test_overlap_skip_drops_a_fire_while_its_run_runs_then_fires_again(
    spool: Path, tmp_path: Path, clock: ManualClock, daemon: Callable[[str], Daemon]
) -> None:
    d = daemon("")
    gate = tmp_path / "gate"
    gate.mkdir()
    drop(spool, "tick.yaml", gated("tick", gate, "  schedule: {every: 10s, overlap: skip}\n"))
    turn(d, clock, lambda: (spool / "schedules" / "tick.yaml").exists(), "the schedule")
    clock.advance(10)
    turn(d, clock, lambda: d.engine.tasks_running == 1, "a first run's task")
    clock.advance(10)  # the next fire: its run still runs
    d.step(clock.monotonic())
    assert len(runs_of(spool, "schedules/tick.yaml")) == 1
    [first] = runs_of(spool, "schedules/tick.yaml")
    (gate / first["run_id"]).touch()
    turn(d, clock, lambda: states(spool, "schedules/tick.yaml") == ["succeeded"], "its end")
    clock.advance(10)
    turn(d, clock, lambda: len(runs_of(spool, "schedules/tick.yaml")) == 2, "the next fire")
    assert d.fires.misfires == 0


def test_overlap_queue_holds_one_fire_and_runs_it_when_the_run_ends(
    spool: Path, tmp_path: Path, clock: ManualClock, daemon: Callable[[str], Daemon]
) -> None:
    d = daemon("")
    gate = tmp_path / "gate"
    gate.mkdir()
    drop(spool, "q.yaml", gated("q", gate, "  schedule: {every: 10s, overlap: queue}\n"))
    turn(d, clock, lambda: (spool / "schedules" / "q.yaml").exists(), "the schedule")
    clock.advance(10)
    turn(d, clock, lambda: d.engine.tasks_running == 1, "a first run's task")
    for _ in range(3):  # three fires while it runs: one is held, the others skipped
        clock.advance(10)
        d.step(clock.monotonic())
    assert d.fires.table.held("q") is not None
    assert len(runs_of(spool, "schedules/q.yaml")) == 1
    [first] = runs_of(spool, "schedules/q.yaml")
    (gate / first["run_id"]).touch()
    turn(d, clock, lambda: len(runs_of(spool, "schedules/q.yaml")) == 2, "the held fire's run")
    assert d.fires.table.held("q") is None
    assert len(runs_of(spool, "schedules/q.yaml")) == 2


def test_fires_missed_beyond_grace_run_once_and_count_as_misfires(
    spool: Path, clock: ManualClock, daemon: Callable[[str], Daemon]
) -> None:
    d = daemon("")
    drop(spool, "m.yaml", job("m", "true", "  schedule: {every: 1m, grace: 10s}\n"))
    turn(d, clock, lambda: (spool / "schedules" / "m.yaml").exists(), "the schedule")
    clock.advance(3600 + 30)  # an hour of fires, the newest 30 s late: all past grace
    turn(d, clock, lambda: states(spool, "schedules/m.yaml") == ["succeeded"], "one run")
    assert d.fires.misfires == 60
    d.step(clock.monotonic())
    assert len(runs_of(spool, "schedules/m.yaml")) == 1


def test_a_stop_gives_running_tasks_stop_timeout_then_ends_the_loop(
    spool: Path, tmp_path: Path, clock: ManualClock, daemon: Callable[[str], Daemon]
) -> None:
    d = daemon("stop_timeout: 30s\n")
    gate = tmp_path / "gate"
    gate.mkdir()
    drop(spool, "slow.yaml", gated("slow", gate, ""))
    turn(d, clock, lambda: d.engine.tasks_running == 1, "the run's task")
    d.stop_asked = True
    d.step(clock.monotonic())
    assert not d.done  # its task has stop_timeout to end
    drop(spool, "late.yaml", job("late", "true"))  # intake is closed
    clock.advance(29)
    d.step(clock.monotonic())
    assert not d.done
    clock.advance(2)
    d.step(clock.monotonic())
    assert d.done
    d.close()
    assert states(spool, "incoming/slow.yaml") == ["stopped"]
    assert runs_of(spool, "incoming/late.yaml") == []
    assert (spool / "incoming" / "late.yaml").exists()


def test_a_reload_applies_the_policy_and_the_cpus_to_what_starts_next(
    spool: Path, tmp_path: Path, clock: ManualClock, daemon: Callable[[str], Daemon]
) -> None:
    d = daemon("cpus: 1\n")
    assert len(d.topology.cpus) == 1
    (tmp_path / "chute.yaml").write_text(
        "cpus: 2\npolicy: best-fit\nhttp: {listen: '127.0.0.1:0'}\nkill_grace: 500ms\n"
    )
    d.reload_asked = True
    d.step(clock.monotonic())
    assert (len(d.topology.cpus), d.engine.policy, d.config.policy) == (2, "best-fit", "best-fit")
    drop(spool, "two.yaml", job("two", "true", "  cpus: 2\n"))
    turn(d, clock, lambda: states(spool, "incoming/two.yaml") == ["succeeded"], "a 2-cpu run")


def test_a_cancel_request_is_carried_out_at_the_next_control_pass(
    spool: Path, tmp_path: Path, clock: ManualClock, daemon: Callable[[str], Daemon]
) -> None:
    from chute.intake import control

    d = daemon("")
    gate = tmp_path / "gate"
    gate.mkdir()
    drop(spool, "c.yaml", gated("c", gate, ""))
    turn(d, clock, lambda: d.engine.tasks_running == 1, "the run's task")
    [rec] = runs_of(spool, "incoming/c.yaml")
    control.submit(d.spool, control.Cancel(run=rec["run_id"]))
    d.step(clock.monotonic())  # the control pass is not due yet: nothing happens
    assert d.engine.tasks_running == 1
    clock.advance(0.25)
    turn(d, clock, lambda: states(spool, "incoming/c.yaml") == ["cancelled"], "the cancel")
    assert load_json(spool / "runs" / rec["run_id"] / "cancel.json")
    assert list((spool / "control").iterdir()) == []


def test_a_fire_whose_run_cannot_be_made_stays_held_and_newer_fires_wait_for_it(
    spool: Path, clock: ManualClock, daemon: Callable[[str], Daemon]
) -> None:
    """A file where the fire's run folder goes makes that one run fail to be made (not the
    whole spool): the fire stays held, a newer fire does not take its place, and once the
    folder can be made both runs are made, in order."""
    d = daemon("")
    drop(spool, "a.yaml", job("a", "true", "  schedule: {every: 10s, overlap: allow}\n"))
    turn(d, clock, lambda: (spool / "schedules" / "a.yaml").exists(), "the schedule")
    first = d.fires.table.next_fire("a", clock.now())
    assert first is not None
    first_id = fire_run_id("a", first)
    (spool / "runs").mkdir(exist_ok=True)
    (spool / "runs" / first_id).write_bytes(b"in the way")
    clock.advance(10)
    d.step(clock.monotonic())
    held = d.fires.table.held("a")
    assert held is not None
    assert held.run_id() == first_id
    clock.advance(10)  # the next fire is due while the first one's run is not made
    d.step(clock.monotonic())
    held = d.fires.table.held("a")
    assert held is not None
    assert held.run_id() == first_id
    assert runs_of(spool, "schedules/a.yaml") == []
    (spool / "runs" / first_id).unlink()
    turn(d, clock, lambda: len(runs_of(spool, "schedules/a.yaml")) == 2, "both fires' runs")
    made = sorted(r["run_id"] for r in runs_of(spool, "schedules/a.yaml"))
    assert made[0] == first_id
    assert made[1] == fire_run_id("a", first + timedelta(seconds=10))
    assert d.fires.table.held("a") is None
