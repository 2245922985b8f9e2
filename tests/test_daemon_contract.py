"""DESIGN.md promises checked on a real daemon: cancel and retry through the CLI, schedule
overlap, live metrics and the daemon's own retention."""

from __future__ import annotations

import itertools
import os
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chute.clock import parse_rfc3339
from conftest import EXAMPLES, Chute, load_json, wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, http_address, job, runs_of

__all__ = ["daemon_factory"]  # a fixture, used by name


def metric(spool: Path, name: str, **labels: str) -> float:
    """The value of a sample on the daemon's live /metrics."""
    with urllib.request.urlopen(f"http://{http_address(spool)}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    pytest.fail(f"{name}{labels or ''} is not on /metrics")


def run_ids(spool: Path) -> list[str]:
    return sorted(
        p.name for p in (spool / "runs").iterdir() if not p.is_symlink() and p.name[0] != "."
    )


# -- cancel, retry ---------------------------------------------------------------------------


def test_cancel_of_an_unknown_run_exits_2_and_names_the_closest(spool: Path, chute: Chute) -> None:
    assert chute("run", str(EXAMPLES / "hello.yaml")).code == 0
    real = runs_of(spool)[0]["run_id"]
    typo = real[:-1] + ("0" if real[-1] != "0" else "1")
    done = chute("cancel", typo)
    assert done.code == 2
    assert done.out == ""
    assert done.err == f"{typo}: no such run (1 runs in {spool / 'runs'}); closest: {real}\n"
    assert load_json(spool / "runs" / real / "run.json")["state"] == "succeeded"


@pytest.mark.slow
def test_cancel_without_a_daemon_cancels_a_queued_run_and_a_restart_never_runs_it(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    ran = tmp_path / "second-ran"
    config = "cpus: 1\nstop_timeout: 500ms\nkill_grace: 500ms\n"
    d = daemon_factory(config).start()
    drop(spool, "first.yaml", job("first", f"test -e {gate} || sleep 30"))
    wait_for(
        "first to run",
        lambda: any(r["state"] == "running" for r in runs_of(spool, "incoming/first.yaml")),
    )
    drop(spool, "second.yaml", job("second", f"echo x >> {ran}"))
    second = wait_for("second to be accepted", lambda: runs_of(spool, "incoming/second.yaml"))
    run_id = second[0]["run_id"]
    queued = spool / "queue" / f"{run_id}.yaml"
    wait_for("second's queue copy", queued.exists)
    assert d.stop() == 0
    run_json = spool / "runs" / run_id / "run.json"
    assert load_json(run_json)["state"] == "queued"  # waited for the one cpu, never started
    # DESIGN.md says `interrupted`; a run that resumes is `stopped` (README, Behaviour).
    assert runs_of(spool, "incoming/first.yaml")[0]["state"] == "stopped"

    done = chute("cancel", run_id)
    assert done.code == 0, done.err
    assert done.out == f"{run_id} cancelled\n"
    rec = load_json(run_json)
    assert rec["state"] == "cancelled"
    assert rec["error"] == "cancelled"
    assert rec["finished_at"] is not None
    assert not queued.exists()

    gate.touch()
    d2 = daemon_factory(config).start()
    assert final_run(spool, "incoming/first.yaml")["state"] == "succeeded"  # resumed
    drop(spool, "third.yaml", job("third", "true"))  # queued behind second, were it queued
    assert final_run(spool, "incoming/third.yaml")["state"] == "succeeded"
    assert not ran.exists()
    assert load_json(run_json)["state"] == "cancelled"
    assert list((spool / "runs" / run_id / "stages").iterdir()) == []
    assert d2.stop() == 0


def test_retry_wait_with_a_daemon_goes_through_control_and_follows_the_new_run(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    counter = tmp_path / "one-ran"
    gate = tmp_path / "go"
    spec = (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: flaky}\nspec:\n  stages:\n"
        f"    - {{name: one, run: 'echo x >> {counter}'}}\n"
        f"    - {{name: two, dependsOn: [one], run: 'test -e {gate}'}}\n"
    )
    d = daemon_factory().start()
    drop(spool, "flaky.yaml", spec)
    old = final_run(spool, "incoming/flaky.yaml")
    assert old["state"] == "failed"
    old_id = old["run_id"]
    gate.touch()

    done = chute("retry", old_id, "--wait")
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert lines[0].startswith(f"retry of {old_id} submitted as ")
    new_id = lines[0].rsplit(" ", 1)[1]
    assert new_id != old_id
    assert lines[1] == (
        f"run {new_id}  pipeline flaky  state succeeded  trigger retry  resumed_from {old_id}"
    )
    rec = load_json(spool / "runs" / new_id / "run.json")
    assert rec["state"] == "succeeded"
    assert rec["resumed_from"] == old_id
    assert rec["trigger"] == {"type": "retry", "source": old_id}
    assert counter.read_text() == "x\n"  # stage one kept, not run again
    assert (spool / "runs" / new_id / "stages" / "one" / "output.json").exists()
    assert list((spool / "control").iterdir()) == []
    assert f"{new_id} retry of {old_id} keeps 1 stage(s)" in d.log.read_text()  # the daemon's
    assert d.stop() == 0


# -- schedules -------------------------------------------------------------------------------


def spans(spool: Path, source: str) -> list[tuple[float, float]]:
    """(started, finished) of the started runs of `source`, by start; unfinished end at +inf."""
    out: list[tuple[float, float]] = []
    for r in runs_of(spool, source):
        if r["started_at"] is None:
            continue
        end = parse_rfc3339(r["finished_at"]).timestamp() if r["finished_at"] else float("inf")
        out.append((parse_rfc3339(r["started_at"]).timestamp(), end))
    return sorted(out)


def overlapping(iv: list[tuple[float, float]]) -> bool:
    return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(iv))


@pytest.mark.parametrize("overlap", ["skip", "allow"], ids=["skip", "allow"])
@pytest.mark.slow
def test_schedule_overlap_skip_never_overlaps_and_allow_does(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, overlap: str
) -> None:
    d = daemon_factory("cpus: 2\nstop_timeout: 500ms\nkill_grace: 500ms\n").start()
    schedule = f"  schedule: {{every: 1s, overlap: {overlap}}}\n"
    drop(spool, "ov.yaml", job("ov", "sleep 2.5", schedule))
    source = "schedules/ov.yaml"
    if overlap == "skip":
        wait_for("two runs to start", lambda: len(spans(spool, source)) >= 2, 15)
        assert "skipped: previous run still running" in d.log.read_text()
    else:
        wait_for("a run to start while another runs", lambda: overlapping(spans(spool, source)))
    assert chute("unschedule", "ov").code == 0
    assert d.stop() == 0
    iv = spans(spool, source)
    assert len(iv) >= 2
    assert overlapping(iv) == (overlap == "allow")


def held_at(spool: Path, name: str) -> float | None:
    """The fire time overlap: queue holds for schedule `name`, from state/schedules.json."""
    path = spool / "state" / "schedules.json"
    held = load_json(path).get(name, {}).get("held") if path.exists() else None
    return None if held is None else parse_rfc3339(held["fire_time"]).timestamp()


@pytest.mark.slow
def test_schedule_overlap_queue_holds_one_fire_through_a_kill_and_runs_it_after(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    config = "cpus: 2\nstop_timeout: 500ms\nkill_grace: 500ms\n"
    gate = tmp_path / "gate"
    d = daemon_factory(config).start()
    schedule = "  schedule: {every: 1s, overlap: queue}\n"
    drop(spool, "q.yaml", job("q", f"until [ -e {gate} ]; do sleep 0.05; done", schedule))
    source = "schedules/q.yaml"
    wait_for("a fire held", lambda: "queued behind its running run" in d.log.read_text(), 15)
    held = held_at(spool, "q")
    assert held is not None
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    [first] = runs_of(spool, source)  # the one that holds the fire, left running

    d = daemon_factory(config).start()
    gate.touch()

    def is_held(rec: dict[str, Any]) -> bool:  # run.json has milliseconds, the state more
        return abs(parse_rfc3339(rec["trigger"]["fire_time"]).timestamp() - held) < 0.001

    def held_run() -> dict[str, Any] | None:
        found = [r for r in runs_of(spool, source) if is_held(r)]
        return found[0] if found and found[0]["state"] == "succeeded" else None

    wait_for("the held fire's run to succeed", lambda: held_run() is not None, 15)
    assert chute("unschedule", "q").code == 0
    assert d.stop() == 0
    recs = runs_of(spool, source)
    assert [is_held(r) for r in recs].count(True) == 1
    resumed = next(r for r in recs if r["run_id"] == first["run_id"])
    assert (resumed["state"], resumed["recoveries"]) == ("succeeded", 1)
    later = held_run()
    assert later is not None
    assert later["started_at"] >= resumed["finished_at"]
    assert not overlapping(spans(spool, source))


@pytest.mark.slow
def test_a_held_fire_whose_run_was_made_before_a_crash_is_released_not_run_again(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    # The crash comes after the held fire's run was made and before its release was saved:
    # simulated by saving the running run's fire as held again while the daemon is down.
    config = "cpus: 2\nstop_timeout: 500ms\nkill_grace: 500ms\n"
    d = daemon_factory(config).start()
    schedule = "  schedule: {every: 1s, overlap: queue}\n"
    wait = f'until [ -e "{tmp_path}/go-$CHUTE_RUN_ID" ]; do sleep 0.05; done'
    drop(spool, "q.yaml", job("q", wait, schedule))
    source = "schedules/q.yaml"
    wait_for("a fire held", lambda: held_at(spool, "q") is not None, 15)
    [first] = runs_of(spool, source)
    (tmp_path / f"go-{first['run_id']}").touch()
    wait_for("the held fire's run", lambda: len(runs_of(spool, source)) == 2)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    made = next(r for r in runs_of(spool, source) if r["run_id"] != first["run_id"])
    state_file = spool / "state" / "schedules.json"
    state = load_json(state_file)
    state["q"]["held"] = {"fire_time": made["trigger"]["fire_time"], "missed": 0}
    state_file.write_bytes(orjson.dumps(state))
    made_at = parse_rfc3339(made["trigger"]["fire_time"]).timestamp()

    d = daemon_factory(config).start()
    wait_for("a later fire held", lambda: (held_at(spool, "q") or 0) > made_at, 10)
    assert chute("unschedule", "q").code == 0
    assert d.stop() == 0
    assert [r["run_id"] for r in runs_of(spool, source)].count(made["run_id"]) == 1


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_count_schedule_fires(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    d = daemon_factory().start()
    assert metric(spool, "chute_schedule_fires_total") == 0
    drop(spool, "tick.yaml", job("tick", "true", "  schedule: {every: 1s}\n"))
    wait_for("a fire", lambda: runs_of(spool, "schedules/tick.yaml"), 10)
    # The run folder is made before the fire is recorded and counted, in the same loop turn:
    # a scrape may come in between.
    wait_for("the fire counted", lambda: metric(spool, "chute_schedule_fires_total") >= 1, 10)
    assert chute("unschedule", "tick").code == 0
    assert d.stop() == 0


def test_metrics_count_tasks_waiting_for_cpus_and_runs_not_started(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    d = daemon_factory("cpus: 1\n").start()
    drop(spool, "blocker.yaml", job("blocker", f"until test -e {gate}; do sleep 0.05; done"))
    wait_for(
        "the blocker to run",
        lambda: any(r["state"] == "running" for r in runs_of(spool, "incoming/blocker.yaml")),
    )
    drop(spool, "w1.yaml", job("w1", "true"))
    drop(spool, "w2.yaml", job("w2", "true"))
    wait_for("both to be accepted", lambda: len(runs_of(spool)) == 3)

    def gauges() -> tuple[float, float, float]:
        return (
            metric(spool, "chute_tasks_waiting", reason="cpus"),
            metric(spool, "chute_queue_depth"),
            metric(spool, "chute_tasks_running"),
        )

    wait_for("2 waiting, 2 queued, 1 running", lambda: gauges() == (2, 2, 1), 5)
    gate.touch()
    for name in ("blocker", "w1", "w2"):
        assert final_run(spool, f"incoming/{name}.yaml")["state"] == "succeeded"
    wait_for("nothing waiting, queued or running", lambda: gauges() == (0, 0, 0), 5)
    assert d.stop() == 0


# -- retention -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_daemon_applies_retention_itself_and_keeps_every_latest(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    # Dropped before start: taken in name order, so the run ids sort the same way.
    drop(spool, "a-other.yaml", job("other", "true"))
    for i in (1, 2, 3):
        drop(spool, f"b{i}-keep.yaml", job("keep", "true"))
    d = daemon_factory("retention: {keep_runs: 1, max_age: 30d}\n").start()
    other = final_run(spool, "incoming/a-other.yaml")["run_id"]
    keep = [final_run(spool, f"incoming/b{i}-keep.yaml")["run_id"] for i in (1, 2, 3)]
    assert other < keep[0] < keep[1] < keep[2]
    wait_for(
        "the daemon's retention pass",
        lambda: run_ids(spool) == [other, keep[2]],
        15,
    )
    runs = spool / "runs"
    assert os.readlink(runs / "latest") == keep[2]
    assert load_json(runs / "latest" / "run.json")["run_id"] == keep[2]
    pipelines = sorted((spool / "pipelines").iterdir())
    assert [p.name for p in pipelines] == ["keep", "other"]
    for p, run_id in zip(pipelines, (keep[2], other), strict=True):
        assert load_json(p / "latest" / "run.json")["run_id"] == run_id
    # The loop writes its info lines when it next waits: poll, do not read once.
    wait_for("the retention line", lambda: "retention removed 2 run folder(s)" in d.log.read_text())
    assert d.stop() == 0
