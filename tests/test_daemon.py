"""The daemon as users run it: a real process on a temp spool, real drops, real tasks."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import EXAMPLES, Chute, Done, chute_env, load_json, pid_alive, wait_for
from daemon_proc import Daemon, assert_settled, daemon_factory, drop, final_run, job, runs_of

__all__ = ["daemon_factory"]  # a fixture, used by name


def test_a_dropped_job_runs_once_and_its_queue_copy_goes(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory().start()
    drop(spool, "hello.yaml", (EXAMPLES / "hello.yaml").read_text())
    rec = final_run(spool, "incoming/hello.yaml")
    assert rec["state"] == "succeeded"
    assert rec["trigger"]["type"] == "drop"
    wait_for("the queue copy to go", lambda: not any((spool / "queue").iterdir()))
    report = spool / "runs" / rec["run_id"] / "report.html"
    wait_for("the run's report", report.exists)
    assert list((spool / "incoming").iterdir()) == []
    assert (spool / "runs" / rec["run_id"] / "spec.yaml").read_text() == (
        EXAMPLES / "hello.yaml"
    ).read_text()
    assert d.stop() == 0


@pytest.mark.parametrize("sync", ["fsync", "syncfs"])
def test_files_dropped_before_start_and_a_burst_all_run_exactly_once(
    spool: Path, daemon_factory: Callable[..., Daemon], sync: str
) -> None:
    for i in range(5):
        drop(spool, f"early{i}.yaml", job(f"early{i}", "true"))
    d = daemon_factory(f"cpus: 2\nsync: {sync}\n").start()
    assert f" sync={sync} " in d.log.read_text()  # the "daemon started" line
    for i in range(40):
        drop(spool, f"burst{i}.yaml", job(f"burst{i}", "true"))
    names = [f"incoming/early{i}.yaml" for i in range(5)] + [
        f"incoming/burst{i}.yaml" for i in range(40)
    ]
    for name in names:
        assert final_run(spool, name)["state"] == "succeeded"
    counts = {n: len(runs_of(spool, n)) for n in names}
    assert set(counts.values()) == {1}
    assert d.stop() == 0


def test_a_bad_file_is_rejected_with_its_reason_and_the_daemon_goes_on(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory().start()
    drop(
        spool,
        "bad.yaml",
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: bad}\nspec:\n  cpus: 1\n",
    )
    err = wait_for(
        "the rejection", lambda: (spool / "rejected" / "bad.yaml.error.json").exists(), 10
    )
    assert err
    doc = load_json(spool / "rejected" / "bad.yaml.error.json")
    assert doc["file"] == "bad.yaml"
    assert doc["reason"] == "invalid"
    assert doc["errors"][0]["line"] > 0
    assert (spool / "rejected" / "bad.yaml").exists()
    drop(spool, "good.yaml", job("good", "true"))
    assert final_run(spool, "incoming/good.yaml")["state"] == "succeeded"
    assert d.stop() == 0


def test_a_fifo_and_a_symlink_are_refused_without_blocking(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon_factory().start()
    os.mkfifo(spool / "incoming" / "pipe.yaml")
    target = tmp_path / "real.yaml"
    target.write_text(job("real", "true"))
    os.symlink(target, spool / "incoming" / "link.yaml")
    wait_for(
        "both refusals",
        lambda: (
            (spool / "rejected" / "pipe.yaml.error.json").exists()
            and (spool / "rejected" / "link.yaml.error.json").exists()
        ),
        15,
    )
    drop(spool, "after.yaml", job("after", "true"))
    assert final_run(spool, "incoming/after.yaml")["state"] == "succeeded"
    assert runs_of(spool, "incoming/link.yaml") == []
    assert d.stop() == 0


def test_a_second_daemon_on_the_same_spool_exits_2(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    first = daemon_factory().start()
    second = chute("daemon", "--config", str(first.config), timeout=30)
    assert second.code == 2
    assert "another chute daemon (pid " in second.err
    assert "one daemon per spool" in second.err
    assert first.stop() == 0


def _intervals(spool: Path) -> list[tuple[float, float, list[int]]]:
    from chute.clock import parse_rfc3339

    out = []
    for rec in runs_of(spool):
        for s in load_json(spool / "runs" / rec["run_id"] / "manifest.json")["stages"]:
            out.append(
                (
                    parse_rfc3339(s["started_at"]).timestamp(),
                    parse_rfc3339(s["finished_at"]).timestamp(),
                    s["cores"],
                )
            )
    return out


def test_cpu_cap_is_never_exceeded_and_cores_are_not_shared(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("cpus: 2\n").start()
    names = [f"incoming/w{i}.yaml" for i in range(6)]
    for i in range(6):
        drop(spool, f"w{i}.yaml", job(f"w{i}", "sleep 0.3"))
    for n in names:
        assert final_run(spool, n)["state"] == "succeeded"
    iv = _intervals(spool)
    for start, _, _ in iv:
        overlapping = [c for s, f, c in iv if s <= start < f]
        cores = [c for cs in overlapping for c in cs]
        assert len(cores) <= 2
        assert len(cores) == len(set(cores))
    assert d.stop() == 0


def test_higher_priority_starts_first_when_cpus_free_up(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("cpus: 1\n").start()
    drop(spool, "blocker.yaml", job("blocker", "sleep 1"))
    wait_for("the blocker to run", lambda: any(r["state"] == "running" for r in runs_of(spool)))
    drop(spool, "low.yaml", job("low", "true", "  priority: 0\n"))
    drop(spool, "high.yaml", job("high", "true", "  priority: 10\n"))
    wait_for("both to be accepted", lambda: len(runs_of(spool)) == 3)
    low = final_run(spool, "incoming/low.yaml")
    high = final_run(spool, "incoming/high.yaml")
    assert high["started_at"] < low["started_at"]
    assert d.stop() == 0


def test_cancel_stops_a_running_run_and_its_processes(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path, chute: Chute
) -> None:
    pidfile = tmp_path / "pid"
    d = daemon_factory("kill_grace: 1s\n").start()
    drop(spool, "long.yaml", job("long", f"sleep 1000 & echo $! > {pidfile}; wait"))
    wait_for("the task to start", lambda: pidfile.exists() and pidfile.read_text().strip())
    run_id = runs_of(spool, "incoming/long.yaml")[0]["run_id"]
    done = chute("cancel", run_id)
    assert done.code == 0, done.err
    assert done.out.strip() == f"{run_id} cancelled"
    assert not pid_alive(int(pidfile.read_text()))
    again = chute("cancel", run_id)
    assert again.code == 0
    assert again.out.strip() == f"{run_id} already cancelled"
    assert d.stop() == 0


@pytest.mark.slow
def test_kill_9_then_restart_resumes_in_place_without_rerunning_finished_stages(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    counter = tmp_path / "first-ran"
    pidfile = tmp_path / "pid"
    spec = (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: resumable}\nspec:\n  stages:\n"
        f"    - {{name: first, run: 'echo x >> {counter}'}}\n"
        f"    - {{name: second, dependsOn: [first], run: 'test -e {tmp_path}/go || "
        f"(sleep 1000 & echo $! > {pidfile}; wait)'}}\n"
    )
    d = daemon_factory("kill_grace: 1s\n").start()
    drop(spool, "resumable.yaml", spec)
    wait_for("the second stage to start", lambda: pidfile.exists() and pidfile.read_text().strip())
    leftover = int(pidfile.read_text())
    run_id = runs_of(spool, "incoming/resumable.yaml")[0]["run_id"]
    d.stop(signal.SIGKILL)
    assert pid_alive(leftover)  # the task outlived its daemon, as after a real crash
    (tmp_path / "go").touch()
    d2 = daemon_factory("kill_grace: 1s\n").start()
    rec = final_run(spool, "incoming/resumable.yaml")
    assert rec["run_id"] == run_id
    assert rec["state"] == "succeeded"
    assert rec["recoveries"] == 1
    assert_settled(spool / "runs" / run_id)
    assert counter.read_text().count("x") == 1
    assert not pid_alive(leftover)
    assert len(runs_of(spool, "incoming/resumable.yaml")) == 1
    assert d2.stop() == 0


@pytest.mark.slow
def test_sigterm_interrupts_what_outlives_stop_timeout_and_the_next_start_resumes_it(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    d = daemon_factory("stop_timeout: 500ms\nkill_grace: 500ms\n").start()
    drop(spool, "quick.yaml", job("quick", "sleep 0.2"))
    drop(spool, "slow.yaml", job("slow", f"test -e {gate} || sleep 1000"))
    wait_for(
        "slow to run",
        lambda: any(r["state"] == "running" for r in runs_of(spool, "incoming/slow.yaml")),
    )
    assert d.stop() == 0
    slow = runs_of(spool, "incoming/slow.yaml")[0]
    assert slow["state"] == "stopped"  # resumes: not final (`interrupted` is)
    gate.touch()
    d2 = daemon_factory("stop_timeout: 500ms\nkill_grace: 500ms\n").start()
    rec = final_run(spool, "incoming/slow.yaml")
    assert rec["state"] == "succeeded"
    assert rec["recoveries"] == 1
    assert_settled(spool / "runs" / rec["run_id"])
    assert final_run(spool, "incoming/quick.yaml")["state"] == "succeeded"
    assert d2.stop() == 0


def test_notify_socket_gets_ready_watchdog_and_stopping(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(env={"WATCHDOG_USEC": "200000"}).start()
    d.wait_message("WATCHDOG=1", timeout=10)
    assert any(m.startswith("STATUS=") for m in d.messages)
    assert d.stop() == 0
    d.receive()
    assert "STOPPING=1" in d.messages


@pytest.mark.slow
def test_every_schedule_fires_and_unschedule_stops_it(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    d = daemon_factory().start()
    drop(spool, "tick.yaml", job("tick", "true", "  schedule: {every: 1s}\n"))
    wait_for("the schedule file", lambda: (spool / "schedules" / "tick.yaml").exists())
    wait_for(
        "two fires", lambda: len([r for r in runs_of(spool) if r["pipeline"] == "tick"]) >= 2, 15
    )
    rec = next(r for r in runs_of(spool) if r["pipeline"] == "tick")
    assert rec["trigger"]["type"] == "every"
    listed = chute("schedules", timeout=30)
    assert "tick" in listed.out
    assert "every 1s" in listed.out
    done = chute("unschedule", "tick", timeout=30)
    assert done.code == 0
    assert done.out.strip() == "unscheduled tick"
    assert not (spool / "schedules" / "tick.yaml").exists()
    time.sleep(0.2)  # let a fire that was already being made land before counting
    n = len([r for r in runs_of(spool) if r["pipeline"] == "tick"])
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert len([r for r in runs_of(spool) if r["pipeline"] == "tick"]) == n
        time.sleep(0.25)
    assert d.stop() == 0


def test_status_and_runs_describe_the_daemon_and_its_runs(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    def cli(*args: str) -> Done:
        return chute(*args, timeout=30)

    down = cli("status")
    assert down.code == 3
    assert down.out.strip() == f"chute daemon is not running on {spool}"
    d = daemon_factory("cpus: 1\n").start()
    drop(spool, "s.yaml", job("s", "sleep 0.5"))
    wait_for("status.json", lambda: (spool / "state" / "status.json").exists())
    up = cli("status")
    assert up.code == 0
    assert f"chute daemon pid {d.proc.pid} on {spool}" in up.out  # type: ignore[union-attr]
    assert "cpus: " in up.out
    assert "/1 allocated (node 0: " in up.out
    final_run(spool, "incoming/s.yaml")
    listed = cli("runs", "--state", "succeeded")
    assert listed.out.splitlines()[0].split() == [
        "RUN",
        "PIPELINE",
        "STATE",
        "TRIGGER",
        "CREATED",
        "DURATION",
    ]
    assert " s " in listed.out
    assert d.stop() == 0


def test_submit_wait_follows_the_run_and_exits_with_its_result(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path, chute: Chute
) -> None:
    d = daemon_factory().start()
    bad = tmp_path / "fails.yaml"
    bad.write_text(job("fails", "exit 3"))
    done = chute("submit", str(EXAMPLES / "hello.yaml"), "--wait")
    assert done.code == 0, done.err
    assert "submitted" in done.out
    assert "state succeeded" in done.out
    failed = chute("submit", str(bad), "--wait")
    assert failed.code == 1
    assert "state failed" in failed.out
    assert d.stop() == 0


@pytest.mark.slow
def test_every_keeps_its_grid_across_a_restart_and_coalesces_missed_fires(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    from chute.clock import parse_rfc3339

    d = daemon_factory().start()
    drop(spool, "grid.yaml", job("grid", "true", "  schedule: {every: 2s, misfire: run_once}\n"))

    def grid_runs() -> list[dict[str, Any]]:
        return [r for r in runs_of(spool) if r["pipeline"] == "grid"]

    wait_for("the first fire", lambda: len(grid_runs()) >= 1, 10)
    assert d.stop() == 0
    first = parse_rfc3339(grid_runs()[0]["trigger"]["fire_time"]).timestamp()
    wait_for("two fire times to pass", lambda: time.time() > first + 4.6, 10)
    restarted = time.time()
    d2 = daemon_factory().start()
    wait_for("the catch-up fire", lambda: len(grid_runs()) >= 2, 10)
    wait_for("the next regular fire", lambda: len(grid_runs()) >= 3, 10)
    assert d2.stop() == 0
    fires = sorted(parse_rfc3339(r["trigger"]["fire_time"]).timestamp() for r in grid_runs())
    assert len(fires) == len(set(fires))
    for t in fires:  # on the grid set at acceptance, across the restart
        assert abs((t - first) / 2.0 - round((t - first) / 2.0)) < 0.01
    after = [
        r
        for r in grid_runs()
        if parse_rfc3339(r["created_at"]).timestamp() >= restarted
        and parse_rfc3339(r["trigger"]["fire_time"]).timestamp() < restarted
    ]
    assert len(after) == 1  # run_once: the missed fires made one run, not two


def test_sighup_reloads_the_config_and_says_what_needs_a_restart(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("policy: fifo-first-fit\n").start()
    d.messages.clear()
    d.config.write_text("policy: best-fit\nhttp: {listen: '127.0.0.1:19999'}\n")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_message("RELOADING=1")
    d.wait_message("READY=1")
    assert d.messages.index("RELOADING=1") < d.messages.index("READY=1")
    d.config.write_text("policy: nope\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for("the refusal", lambda: "reload refused" in d.log.read_text())
    drop(spool, "after.yaml", job("after", "true"))
    assert final_run(spool, "incoming/after.yaml")["state"] == "succeeded"
    assert d.stop() == 0
    text = d.log.read_text()
    assert "config reloaded from" in text
    assert "config http_listen changed: takes effect after a restart" in text
    assert "policy: 'nope' is not one of" in text


@pytest.mark.slow
def test_sighup_applies_cpus_stop_timeout_and_log_limit_to_what_comes_next(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("cpus: 1\nstop_timeout: 30s\nlog_limit: 1MiB\n").start()

    def total_cpus() -> int:
        st = load_json(spool / "state" / "status.json")
        return sum(n["total"] for n in st["cpus"])

    wait_for("status.json", lambda: (spool / "state" / "status.json").exists())
    assert total_cpus() == 1
    d.config.write_text(
        "cpus: 2\nstop_timeout: 1s\nlog_limit: 10B\nlog_format: json\nhttp: {listen: 127.0.0.1:0}\n"
    )
    assert d.proc is not None
    d.messages.clear()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_message("READY=1")
    wait_for("2 cpus in status.json", lambda: total_cpus() == 2, timeout=5)
    drop(spool, "loud.yaml", job("loud", "seq 100"))
    run = final_run(spool, "incoming/loud.yaml")
    log = (spool / "runs" / run["run_id"] / "stages" / "loud" / "log").read_text()
    assert log.startswith("1\n2\n3\n4\n5")
    assert "--- chute: log capped at 10B; the rest of the output was discarded ---" in log
    drop(spool, "slow.yaml", job("slow", "sleep 60"))
    wait_for("the slow task", lambda: any(r["state"] == "running" for r in runs_of(spool)), 30)
    t = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t < 15  # the old stop_timeout was 30s
    text = d.log.read_text()
    assert re.search(r"config cpus=\S+ \(2\) memory=", text)
    after = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(x["message"].startswith("config reloaded from") for x in after)
    assert any("stage loud finished state=succeeded" in x["message"] for x in after)


@pytest.mark.parametrize("on_restart", ["fail", "resume"])
@pytest.mark.slow
def test_a_crash_before_run_json_says_running_still_counts_the_run_started(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path, on_restart: str
) -> None:
    # run.json turns `running` with the run's first manifest, up to 0.5 s after its first
    # task started; a crash can come first. The stage folder tells recovery it had started.
    ran = tmp_path / "ran"
    config = f"on_restart: {on_restart}\nkill_grace: 500ms\n"
    d = daemon_factory(config).start()
    drop(spool, "once.yaml", job("once", f"echo x >> {ran}; test -e {tmp_path}/go || sleep 1000"))
    wait_for("the task to start", lambda: ran.exists())
    run_id = runs_of(spool, "incoming/once.yaml")[0]["run_id"]
    d.stop(signal.SIGKILL)
    run_json = spool / "runs" / run_id / "run.json"
    rec = load_json(run_json)
    rec.update(state="queued", started_at=None)  # as it is when the crash comes that early
    run_json.write_bytes(orjson.dumps(rec))
    (tmp_path / "go").touch()
    d2 = daemon_factory(config).start()
    rec = final_run(spool, "incoming/once.yaml")
    assert rec["run_id"] == run_id
    assert_settled(spool / "runs" / run_id)
    assert rec["recoveries"] == (1 if on_restart == "resume" else 0)
    if on_restart == "fail":
        assert rec["state"] == "interrupted"
        assert ran.read_text() == "x\n"  # not run a second time
    else:
        assert rec["state"] == "succeeded"
        assert rec["started_at"] is not None
        assert ran.read_text() == "x\nx\n"  # its unfinished stage ran again, in place
    assert len(runs_of(spool, "incoming/once.yaml")) == 1
    assert d2.stop() == 0


# -- control requests across kill -9 ----------------------------------------------------------


def _canary(tmp_path: Path) -> Path:
    """A folder beside the spool that nothing chute does may touch."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep\n")
    return canary


def _untouched(canary: Path) -> bool:
    return sorted(p.name for p in canary.iterdir()) == ["keep"] and (
        (canary / "keep").read_text() == "keep\n"
    )


def _retry_spec(tmp_path: Path) -> str:
    """Two stages to keep (one leaves artifacts), a third that fails until `go` exists."""
    return (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: rt}\nspec:\n  stages:\n"
        f"    - {{name: one, run: 'echo x >> {tmp_path}/one-ran; "
        "for i in 1 2 3; do echo $i > $CHUTE_ARTIFACTS/a$i; done'}\n"
        f"    - {{name: two, run: 'echo x >> {tmp_path}/two-ran'}}\n"
        f"    - {{name: three, dependsOn: [one, two], run: 'echo x >> {tmp_path}/three-ran; "
        f"test -e {tmp_path}/go'}}\n"
    )


@pytest.mark.parametrize("crash_at", ["retry.copied", "control.recorded"])
@pytest.mark.slow
def test_a_retry_killed_mid_way_is_finished_once_under_the_id_the_cli_printed(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path, crash_at: str
) -> None:
    canary = _canary(tmp_path)
    d = daemon_factory(env={"CHUTE_CRASH_AT": crash_at}).start()
    drop(spool, "rt.yaml", _retry_spec(tmp_path))
    old = final_run(spool, "incoming/rt.yaml")
    assert old["state"] == "failed"
    (tmp_path / "go").touch()
    retry = start_chute(spool, "retry", old["run_id"])
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == -signal.SIGKILL  # the crash point fired
    d2 = daemon_factory().start()
    out, err = retry.communicate(timeout=90)  # the id once its run is queued, after the crash
    assert retry.returncode == 0, err
    new_id = out.split()[-1]
    rec = wait_for(
        "the retry to end",
        lambda: (
            (r := load_json(spool / "runs" / new_id / "run.json"))["state"] == "succeeded" and r
        ),
        30,
    )
    assert rec["trigger"] == {"type": "retry", "source": old["run_id"]}
    retries = [r for r in runs_of(spool) if r["trigger"]["type"] == "retry"]
    assert [r["run_id"] for r in retries] == [new_id]  # the printed id, made once
    assert (tmp_path / "one-ran").read_text() == "x\n"  # kept, never run again
    assert (tmp_path / "two-ran").read_text() == "x\n"
    assert (tmp_path / "three-ran").read_text() == "x\nx\n"
    artifacts = spool / "runs" / new_id / "stages" / "one" / "artifacts"
    assert sorted(p.name for p in artifacts.iterdir()) == ["a1", "a2", "a3"]
    assert (artifacts / "a3").read_text() == "3\n"
    assert [
        p.name for p in (spool / "runs" / new_id / "stages").iterdir() if p.name[0] == "."
    ] == []
    wait_for("queue/ and control/ to empty", lambda: not any((spool / "queue").iterdir()))
    assert list((spool / "control").iterdir()) == []
    assert load_json(spool / "runs" / old["run_id"] / "run.json") == old
    assert _untouched(canary)
    assert d2.stop() == 0


@pytest.mark.slow
def test_a_kill_9_while_a_retry_copies_big_artifacts_loses_no_run(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    """The reported case: 400 × 1 MiB artifacts make the copy take a while; kill -9 then."""
    spec = (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: big}\nspec:\n  stages:\n"
        "    - {name: make, run: 'for i in $(seq 400); do "
        "head -c 1048576 /dev/zero > $CHUTE_ARTIFACTS/f$i; done'}\n"
        f"    - {{name: use, dependsOn: [make], run: 'test -e {tmp_path}/go'}}\n"
    )
    d = daemon_factory().start()
    drop(spool, "big.yaml", spec)
    old = final_run(spool, "incoming/big.yaml", timeout=120)
    assert old["state"] == "failed"
    (tmp_path / "go").touch()
    retry = start_chute(spool, "retry", old["run_id"])

    def made() -> str | None:
        return next((r["run_id"] for r in runs_of(spool) if r["trigger"]["type"] == "retry"), None)

    new_id = wait_for("the retry's run folder", made, 30)
    d.stop(signal.SIGKILL)  # while it copies: the folder exists, its queue file does not
    assert not (spool / "queue" / f"{new_id}.yaml").exists()
    assert retry.poll() is None  # no id printed for a run not queued yet
    d2 = daemon_factory().start()
    out, err = retry.communicate(timeout=120)
    assert (retry.returncode, out) == (0, f"retry of {old['run_id']} submitted as {new_id}\n"), err
    rec = final_run(spool, old["run_id"], timeout=120)  # the retry's trigger source
    assert (rec["run_id"], rec["state"]) == (new_id, "succeeded")
    assert len(list((spool / "runs" / new_id / "stages" / "make" / "artifacts").iterdir())) == 400
    assert d2.stop() == 0


def start_chute(spool: Path, *args: str, config: Path | None = None) -> subprocess.Popen[str]:
    """`chute ARGS --spool SPOOL` in the background."""
    extra = ["--config", str(config)] if config is not None else []
    return subprocess.Popen(
        [sys.executable, "-m", "chute", *args, "--spool", str(spool), *extra],
        env=chute_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stopped_with_a_retry_waiting(spool: Path, d: Daemon, old_id: str) -> subprocess.Popen[str]:
    """SIGSTOP the daemon, then `chute retry OLD` in the background, once its request waits
    in control/ (the daemon takes it after SIGCONT)."""
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    retry = start_chute(spool, "retry", old_id)
    wait_for("the retry request in control/", lambda: any((spool / "control").glob("*.json")), 30)
    return retry


def test_retention_keeps_a_run_a_waiting_retry_request_names(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gc_config = tmp_path / "gc.yaml"  # `chute gc`'s alone: the daemon's retention keeps all
    gc_config.write_text("retention: {keep_runs: 1, max_age: 30d}\n")
    d = daemon_factory().start()
    drop(spool, "first.yaml", job("same", "true"))
    old = final_run(spool, "incoming/first.yaml")
    drop(spool, "second.yaml", job("same", "true"))
    final_run(spool, "incoming/second.yaml")  # the newest: `old` is beyond keep_runs
    retry = _stopped_with_a_retry_waiting(spool, d, old["run_id"])
    try:
        gc = chute("gc", env={"CHUTE_CONFIG": str(gc_config)})
        assert (gc.code, gc.out.splitlines()[0]) == (
            0,
            "removed 0 run(s) (keep_runs 1, max_age 30d)",
        ), gc.err
        assert (spool / "runs" / old["run_id"] / "run.json").exists()
    finally:
        assert d.proc is not None
        d.proc.send_signal(signal.SIGCONT)
    out, err = retry.communicate(timeout=90)
    assert retry.returncode == 0, err
    assert out.startswith(f"retry of {old['run_id']} submitted as ")
    rec = final_run(spool, old["run_id"])  # the retry's trigger source
    assert (rec["run_id"], rec["state"]) == (out.split()[-1], "succeeded")
    gc = chute("gc", env={"CHUTE_CONFIG": str(gc_config)})  # once the retry is made, it may go
    assert gc.out.startswith("removed 2 run(s)"), gc.out  # the old run and `second`
    assert d.stop() == 0


def test_a_retry_the_daemon_refuses_prints_no_run_id(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    """The run goes after the CLI checked it and before the daemon takes the request (a
    remover that looked at control/ before the request was there): the daemon refuses, and
    the CLI says so instead of printing an id that never becomes a run."""
    d = daemon_factory().start()
    drop(spool, "first.yaml", job("same", "true"))
    old = final_run(spool, "incoming/first.yaml")
    retry = _stopped_with_a_retry_waiting(spool, d, old["run_id"])
    shutil.rmtree(spool / "runs" / old["run_id"])
    assert d.proc is not None
    d.proc.send_signal(signal.SIGCONT)
    out, err = retry.communicate(timeout=90)
    assert (retry.returncode, out) == (2, ""), err
    request = next((spool / "rejected").glob("*-retry.json")).name
    assert err == (
        f"the daemon refused the request: retry refused: {old['run_id']}: no such run (its "
        f"folder or run.json is gone) ({spool / 'rejected' / request}.error.json)\n"
    )
    assert [r["trigger"]["type"] for r in runs_of(spool)] == []  # no run, not even half made
    assert d.stop() == 0


@pytest.mark.parametrize("kill", ["during-grace", "control.recorded"])
@pytest.mark.slow
def test_a_cancel_survives_a_kill_9_and_the_stage_never_runs_again(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path, kill: str
) -> None:
    starts = tmp_path / "starts"
    env = {"CHUTE_CRASH_AT": kill} if kill != "during-grace" else None
    d = daemon_factory("kill_grace: 60s\n", env=env).start()
    drop(spool, "stubborn.yaml", job("stubborn", f"echo x >> {starts}; trap '' TERM; sleep 100"))
    wait_for("the task to start", starts.exists)
    run_id = runs_of(spool, "incoming/stubborn.yaml")[0]["run_id"]
    cancel = subprocess.Popen(
        [sys.executable, "-m", "chute", "cancel", run_id, "--spool", str(spool)],
        env=chute_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for("the cancel to be recorded", (spool / "runs" / run_id / "cancel.json").exists)
        if kill == "during-grace":
            wait_for("the request to be done", lambda: not any((spool / "control").iterdir()))
            d.stop(signal.SIGKILL)  # the task ignores TERM: the run is in its kill grace
        else:
            assert d.proc is not None
            assert d.proc.wait(timeout=30) == -signal.SIGKILL
        assert load_json(spool / "runs" / run_id / "run.json")["state"] != "cancelled"
        d2 = daemon_factory("kill_grace: 500ms\n").start()
        out, err = cancel.communicate(timeout=60)
    finally:
        if cancel.poll() is None:
            cancel.kill()
            cancel.wait()
    assert (cancel.returncode, out) == (0, f"{run_id} cancelled\n"), err
    rec = final_run(spool, "incoming/stubborn.yaml")
    assert (rec["state"], rec["error"]) == ("cancelled", "cancelled")
    assert starts.read_text() == "x\n"  # not resumed, not run again
    manifest = load_json(spool / "runs" / run_id / "manifest.json")
    assert manifest["stages"][0]["state"] == "cancelled"
    wait_for(
        "the queue file and the replayed request to go",
        lambda: not any((spool / "queue").iterdir()) and not any((spool / "control").iterdir()),
    )
    assert d2.stop() == 0


@pytest.mark.slow
def test_an_unschedule_survives_a_kill_9_before_its_request_is_removed(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    d = daemon_factory(env={"CHUTE_CRASH_AT": "control.recorded"}).start()
    drop(spool, "tick.yaml", job("tick", "true", "  schedule: {every: 1s}\n"))
    wait_for("the schedule file", (spool / "schedules" / "tick.yaml").exists)
    done = chute("unschedule", "tick", timeout=30)
    assert (done.code, done.out) == (0, "unscheduled tick\n")
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == -signal.SIGKILL
    assert len(list((spool / "control").iterdir())) == 1  # the request, to be replayed
    d2 = daemon_factory().start()
    wait_for("the replayed request to go", lambda: not any((spool / "control").iterdir()))
    assert not (spool / "schedules" / "tick.yaml").exists()
    assert "tick" not in chute("schedules", timeout=30).out
    fired = len(runs_of(spool))
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert len(runs_of(spool)) == fired
        time.sleep(0.25)
    assert d2.stop() == 0


@pytest.mark.slow
def test_a_fire_whose_run_was_made_but_not_queued_is_finished_not_made_again(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon_factory(env={"CHUTE_CRASH_AT": "schedules.run_made"}).start()
    ran = tmp_path / "ran"
    drop(
        spool, "tick.yaml", job("tick", f"echo $CHUTE_RUN_ID >> {ran}", "  schedule: {every: 2s}\n")
    )
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == -signal.SIGKILL
    (made,) = runs_of(spool)
    assert made["state"] == "queued"
    assert not (spool / "queue" / f"{made['run_id']}.yaml").exists()
    d2 = daemon_factory().start()
    rec = _succeeded(spool, made["run_id"], "the fire's run to end")
    assert rec["created_at"] == made["created_at"]  # the same run, finished, not made again
    assert ran.read_text().splitlines()[0] == made["run_id"]
    assert ran.read_text().splitlines().count(made["run_id"]) == 1
    assert d2.stop() == 0


def _succeeded(spool: Path, run_id: str, what: str) -> dict[str, Any]:
    """Wait (30 s at most) for run `run_id` to succeed; its run.json."""
    path = spool / "runs" / run_id / "run.json"
    done: dict[str, Any] = wait_for(
        what, lambda: (r := load_json(path))["state"] == "succeeded" and r, 30
    )
    return done


def _tick_made_not_queued(
    spool: Path, daemon_factory: Callable[..., Daemon], ran: Path
) -> dict[str, Any]:
    """An `every: 1s` schedule whose first fire's run was made, and the daemon killed before
    that run was queued: that run's record."""
    d = daemon_factory(env={"CHUTE_CRASH_AT": "schedules.run_made"}).start()
    drop(
        spool, "tick.yaml", job("tick", f"echo $CHUTE_RUN_ID >> {ran}", "  schedule: {every: 1s}\n")
    )
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == -signal.SIGKILL
    (made,) = runs_of(spool)
    assert made["state"] == "queued"
    assert not (spool / "queue" / f"{made['run_id']}.yaml").exists()
    return made


def _later_fires_due(made: dict[str, Any]) -> None:
    """The daemon stays down until two more fire times of the schedule have passed."""
    fire = datetime.fromisoformat(made["trigger"]["fire_time"].replace("Z", "+00:00"))
    wait_for(
        "two more fire times to pass", lambda: datetime.now(UTC) > fire + timedelta(seconds=2.5)
    )


@pytest.mark.slow
def test_a_fire_made_but_not_queued_is_finished_though_newer_fires_are_due_at_restart(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    made = _tick_made_not_queued(spool, daemon_factory, ran)
    _later_fires_due(made)  # the next start's newest due fire is another one
    d2 = daemon_factory().start()
    rec = _succeeded(spool, made["run_id"], "the half-made fire's run to end")
    assert rec["created_at"] == made["created_at"]  # the same run, finished, not made again
    assert ran.read_text().splitlines().count(made["run_id"]) == 1
    assert chute("unschedule", "tick", timeout=30).code == 0
    wait_for("the schedule's runs to end", lambda: not any((spool / "queue").iterdir()), 30)
    fires = [r for r in runs_of(spool) if r["trigger"]["type"] == "every"]
    assert {r["state"] for r in fires} == {"succeeded"}  # none left queued
    assert d2.stop() == 0


def test_a_request_being_written_as_the_daemon_starts_is_not_removed_under_its_writer(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    """A CLI writes its request to a temp name, then renames it into control/; the daemon's
    start-up removes the temp files a crash left there, but not one whose writer lives."""
    d = daemon_factory().start()
    drop(spool, "tick.yaml", job("tick", "true", "  schedule: {every: 1h}\n"))
    wait_for("the schedule file", (spool / "schedules" / "tick.yaml").exists)
    assert d.stop() == 0
    writer = subprocess.Popen(["sleep", "60"])  # a `chute unschedule` between write and rename
    try:
        temp = spool / "control" / f".tmp-1-{writer.pid}-unschedule.json.{writer.pid}"
        temp.write_bytes(b'{"action": "unschedule", "name": "tick"}')
        d2 = daemon_factory().start()
        os.rename(temp, spool / "control" / f"1-{writer.pid}-unschedule.json")
    finally:
        writer.kill()
        writer.wait()
    wait_for("the request carried out", lambda: not (spool / "schedules" / "tick.yaml").exists())
    wait_for("its log line", lambda: "schedule tick unscheduled by request" in d2.log.read_text())
    assert d2.stop() == 0


def test_a_fire_made_but_not_queued_ends_cancelled_when_its_schedule_went_meanwhile(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    made = _tick_made_not_queued(spool, daemon_factory, ran)
    (spool / "schedules" / "tick.yaml").unlink()  # the operator removed it while chute was down
    d2 = daemon_factory().start()
    rec = load_json(spool / "runs" / made["run_id"] / "run.json")
    fire = made["trigger"]["fire_time"]
    assert (rec["state"], rec["error"]) == (
        "cancelled",
        f"schedule tick was removed or changed before the run of its fire at {fire} was queued",
    )
    assert f"{made['run_id']} cancelled: schedule tick was removed" in d2.log.read_text()
    assert not ran.exists()
    assert runs_of(spool) == [rec]  # nothing else fired
    assert d2.stop() == 0


# -- recovery that fails for one run ---------------------------------------------------------

DAMAGE = [
    "torn-run-json",
    "run-json-not-an-object",
    "spec-missing",
    "manifest-a-folder",
    "stage-folder-a-file",
]


def _damage(name: str, run: Path) -> None:
    """Leave run folder `run` as the case `name` says (a disk fault or a human did it)."""
    if name == "torn-run-json":
        (run / "run.json").write_bytes(b'{"run_id": "2026')
    elif name == "run-json-not-an-object":
        (run / "run.json").write_bytes(b"[]")
    elif name == "spec-missing":
        (run / "spec.yaml").unlink()
    elif name == "manifest-a-folder":
        (run / "manifest.json").unlink(missing_ok=True)
        (run / "manifest.json").mkdir()
    else:
        shutil.rmtree(run / "stages" / "d")
        (run / "stages" / "d").write_text("not a folder")


EXPECTED_ERROR = {
    "spec-missing": "spec.yaml: No such file or directory",
    "manifest-a-folder": "manifest.json: is a directory, not a regular file",
    "stage-folder-a-file": "stages/d is not a folder",
}


def test_a_run_recovery_cannot_resume_ends_alone_and_the_daemon_starts(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    d = daemon_factory("cpus: 2\nkill_grace: 500ms\n").start()
    names = ["stage-folder-a-file", "sound", *DAMAGE[:-1]]  # the first two start (2 cpus)
    for name in names:
        drop(spool, f"{name}.yaml", job("d", f"test -e {gate} || sleep 1000"))

    def ready() -> bool:
        first = runs_of(spool, "incoming/stage-folder-a-file.yaml")
        started = first and (spool / "runs" / first[0]["run_id"] / "stages" / "d").is_dir()
        handed = not os.listdir(spool / "state" / "intake")  # no claim left: recovery's turn
        return bool(started) and handed and len(os.listdir(spool / "queue")) == len(names)

    wait_for("every run accepted and the first started", ready, 30)
    ids = {name: runs_of(spool, f"incoming/{name}.yaml")[0]["run_id"] for name in names}
    d.stop(signal.SIGKILL)
    for name in DAMAGE:
        _damage(name, spool / "runs" / ids[name])
    gate.touch()
    d2 = daemon_factory("cpus: 2\nkill_grace: 500ms\n").start()
    sound = spool / "runs" / ids["sound"] / "run.json"
    wait_for("the sound run to succeed", lambda: load_json(sound)["state"] == "succeeded", 30)
    for name in ("torn-run-json", "run-json-not-an-object"):  # no record to write: set aside
        run_id = ids[name]
        assert not (spool / "queue" / f"{run_id}.yaml").exists()
        assert (spool / "queue" / f"{run_id}.yaml.unrecoverable").exists()
    for name, error in EXPECTED_ERROR.items():
        rec = load_json(spool / "runs" / ids[name] / "run.json")
        assert rec["state"] == "failed", name
        assert rec["error"].startswith("recovery failed: "), name
        assert error in rec["error"], name
        assert not (spool / "queue" / f"{ids[name]}.yaml").exists()
    text = d2.log.read_text()
    assert "Traceback" not in text
    assert text.count(" recovery failed: ") == len(DAMAGE)
    assert d2.stop() == 0
    d3 = daemon_factory("cpus: 2\n").start()  # nothing left to fail again
    assert " recovery failed: " not in d3.log.read_text().split("daemon stopped")[-1]
    assert d3.stop() == 0


def _gated(gate: Path, priority: int = 100) -> str:
    """A Job that holds the node's one CPU until `gate` exists."""
    return job(
        "blocker", f"while [ ! -e {gate} ]; do sleep 0.02; done", f"  priority: {priority}\n"
    )


def test_waiting_tasks_start_by_priority_then_acceptance_then_stage_and_shard_across_runs(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    gate, order = tmp_path / "gate", tmp_path / "order"
    d = daemon_factory("cpus: 1\n").start()
    drop(spool, "blocker.yaml", _gated(gate))
    wait_for("the blocker to run", lambda: any(r["state"] == "running" for r in runs_of(spool)))
    note = f'echo "$CHUTE_STAGE $CHUTE_SHARD_INDEX" >> {order}'

    def stage(name: str, extra: str = "") -> str:
        return f"    - {{name: {name}, run: '{note}'{extra}}}\n"

    def pipeline(name: str, priority: int, stages: str) -> str:
        return (
            f"apiVersion: chute/v1\nkind: Pipeline\nmetadata: {{name: {name}}}\n"
            f"spec:\n  priority: {priority}\n  stages:\n{stages}"
        )

    drops = [
        ("a", 0, stage("a1", ", shards: 3") + stage("a2") + stage("a3", ", dependsOn: [a1]")),
        ("b", 5, stage("b1", ", shards: 2")),
        ("c", 0, stage("c1", ", shards: 2")),
        ("d", 5, stage("d1")),
    ]
    for n, (name, priority, stages) in enumerate(drops, start=2):
        drop(spool, f"{name}.yaml", pipeline(name, priority, stages))
        wait_for(f"{name} to be accepted", lambda n=n: len(runs_of(spool)) == n)
    gate.touch()
    for name, _, _ in drops:
        assert final_run(spool, f"incoming/{name}.yaml")["state"] == "succeeded"
    assert order.read_text().splitlines() == [
        "b1 0", "b1 1", "d1 0",  # priority 5, in acceptance order
        "a1 0", "a1 1", "a1 2", "a2 0", "a3 0",  # then priority 0: a's stages in order
        "c1 0", "c1 1",
    ]  # fmt: skip
    assert d.stop() == 0


@pytest.mark.slow
def test_files_wait_in_incoming_while_the_daemon_holds_its_bound_of_tasks(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    from chute.daemon import MAX_ACTIVE_TASKS
    from chute.spec.fields import MAX_RUN_TASKS

    gate = tmp_path / "gate"
    d = daemon_factory("cpus: 1\nrescan_interval: 1s\nstop_timeout: 1s\nkill_grace: 1s\n").start()
    drop(spool, "blocker.yaml", _gated(gate))
    wait_for("the blocker to run", lambda: any(r["state"] == "running" for r in runs_of(spool)))
    held = -(-(MAX_ACTIVE_TASKS - 1) // MAX_RUN_TASKS)  # big runs taken until the bound is met
    for i in range(held + 2):
        drop(spool, f"big{i:02d}.yaml", job(f"big{i:02d}", "true", f"  shards: {MAX_RUN_TASKS}\n"))
    queue = spool / "queue"
    wait_for(f"{held} big runs accepted", lambda: len(list(queue.iterdir())) == 1 + held, 60)
    deadline = time.monotonic() + 2.5  # two rescans: neither takes the two left
    while time.monotonic() < deadline:
        assert sorted(p.name for p in (spool / "incoming").iterdir()) == [
            f"big{i:02d}.yaml" for i in range(held, held + 2)
        ]
        assert len(list(queue.iterdir())) == 1 + held
        time.sleep(0.25)
    status = load_json(spool / "state" / "status.json")
    tasks = status["tasks"]
    assert (tasks["running"], tasks["waiting"]) == (1, held * MAX_RUN_TASKS)
    assert tasks["waiting_for"]["cpus"] == held * MAX_RUN_TASKS
    assert list((spool / "rejected").iterdir()) == []
    assert d.stop() == 0


def test_a_stage_retried_a_hundred_times_keeps_a_small_manifest_that_counts_every_attempt(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    d = daemon_factory("cpus: 2\n").start()
    retries = "retries: {max: 100, delay: 1ms}"
    drop(
        spool,
        "stubborn.yaml",
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: stubborn}\nspec:\n  stages:\n"
        f"    - {{name: flaky, run: 'exit 3', {retries}}}\n"
        f"    - {{name: fan, run: '[ $CHUTE_SHARD_INDEX = 1 ] || exit 3', shards: 2, {retries}}}\n",
    )
    rec = final_run(spool, "incoming/stubborn.yaml", timeout=120)
    assert rec["state"] == "failed"
    run_dir = spool / "runs" / rec["run_id"]
    manifest = run_dir / "manifest.json"
    stages = {s["name"]: s for s in load_json(manifest)["stages"]}
    fan = stages["fan"]["shards"]
    assert (fan[1]["state"], fan[1]["attempts_total"], fan[1]["attempts_omitted"]) == (
        "succeeded",
        1,
        0,
    )
    for entry in [stages["flaky"], fan[0]]:
        assert entry["state"] == "failed"
        assert [a["attempt"] for a in entry["attempts"]] == [1, 2, 3, 99, 100, 101]
        assert {a["exit_code"] for a in entry["attempts"]} == {3}
        assert (entry["attempts_total"], entry["attempts_omitted"]) == (101, 95)
    assert (stages["fan"]["attempts_total"], stages["fan"]["attempts"]) == (0, [])
    assert manifest.stat().st_size < 12_000  # 203 attempts made, 13 listed
    assert "stage flaky finished state=failed exit_code=3 attempt=101/101" in d.log.read_text()
    tries = re.findall(
        r"^--- chute: attempt (\d+) at ", (run_dir / "stages/flaky/log").read_text(), re.M
    )
    assert tries == [str(n) for n in range(2, 102)]
    shown = chute("show", rec["run_id"])
    assert re.search(r"^flaky\s+failed\s+101\s", shown.out, re.M), shown.out
    assert re.search(r"^  \[0\]\s+failed\s+101\s", shown.out, re.M), shown.out
    assert d.stop() == 0
