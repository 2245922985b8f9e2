"""However a run ends, its run.json and manifest.json agree (daemon_proc.assert_settled), and
a run the daemon will resume says so in run.json (`stopped`), apart from one that is over."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Chute, load_json, wait_for
from daemon_proc import (
    Daemon,
    assert_settled,
    daemon_factory,
    drop,
    final_run,
    job,
    runs_of,
)

__all__ = ["daemon_factory"]  # a fixture, used by name

CONFIG = "cpus: 2\nstop_timeout: 500ms\nkill_grace: 500ms\n"


def _wide(gate: Path) -> str:
    """A first stage, a sharded one whose shard 1 waits for `gate`, and one after it."""
    return (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: wide}\nspec:\n  stages:\n"
        "    - {name: first, run: 'true'}\n"
        "    - name: wide\n      dependsOn: [first]\n      shards: 2\n"
        f'      run: test "$CHUTE_SHARD_INDEX" = 0 || test -e {gate} || sleep 1000\n'
        "    - {name: after, dependsOn: [wide], run: 'true'}\n"
    )


def _manifest(spool: Path, run_id: str) -> dict[str, Any]:
    stages = load_json(spool / "runs" / run_id / "manifest.json")["stages"]
    return {s["name"]: s for s in stages}


def _shard_running_on_disk(spool: Path) -> str | None:
    """The run id once its manifest on disk shows shard 1 of `wide` running."""
    for rec in runs_of(spool, "incoming/wide.yaml"):
        path = spool / "runs" / rec["run_id"] / "manifest.json"
        if path.exists():
            shards = _manifest(spool, rec["run_id"])["wide"]["shards"]
            if shards and shards[1]["state"] == "running" and shards[0]["state"] == "succeeded":
                return str(rec["run_id"])
    return None


def test_runs_that_succeed_fail_time_out_or_are_cancelled_leave_nothing_open(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    counter = tmp_path / "count"
    d = daemon_factory(CONFIG).start()
    flaky = f"echo x >> {counter}; test $(wc -l < {counter}) -ge 2"
    drop(spool, "ok.yaml", job("ok", flaky, "  retries: {max: 2, delay: 50ms}\n"))
    drop(spool, "bad.yaml", job("bad", "exit 3", "  retries: {max: 1, delay: 50ms}\n"))
    drop(spool, "slow.yaml", job("slow", "sleep 30", "  timeout: 500ms\n"))
    drop(spool, "gone.yaml", job("gone", "sleep 1000"))
    wait_for(
        "gone to run",
        lambda: any(r["state"] == "running" for r in runs_of(spool, "incoming/gone.yaml")),
    )
    gone = runs_of(spool, "incoming/gone.yaml")[0]["run_id"]
    assert chute("cancel", gone).code == 0
    ends = {}
    for name in ("ok", "bad", "slow", "gone"):
        rec = final_run(spool, f"incoming/{name}.yaml")
        ends[name] = assert_settled(spool / "runs" / rec["run_id"])["state"]
    assert ends == {"ok": "succeeded", "bad": "failed", "slow": "failed", "gone": "cancelled"}
    slow = runs_of(spool, "incoming/slow.yaml")[0]["run_id"]
    assert _manifest(spool, slow)["slow"]["state"] == "timed_out"
    ok = runs_of(spool, "incoming/ok.yaml")[0]["run_id"]
    assert [a["exit_code"] for a in _manifest(spool, ok)["ok"]["attempts"]] == [1, 0]
    assert d.stop() == 0


@pytest.mark.slow
def test_sigterm_leaves_a_run_stopped_with_no_stage_running_and_the_next_start_resumes_it(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    d = daemon_factory(CONFIG).start()
    drop(spool, "wide.yaml", _wide(gate))
    run_id = wait_for("shard 1 running, on disk", lambda: _shard_running_on_disk(spool))
    assert d.stop() == 0
    rec = load_json(spool / "runs" / run_id / "run.json")
    assert rec["state"] == "stopped"
    assert rec["error"] == "the daemon stopped before the run ended; it resumes at next start"
    assert rec["finished_at"] is None
    assert (spool / "queue" / f"{run_id}.yaml").exists()
    stages = _manifest(spool, run_id)
    assert {n: s["state"] for n, s in stages.items()} == {
        "first": "succeeded",
        "wide": "pending",
        "after": "pending",
    }
    assert [s["state"] for s in stages["wide"]["shards"]] == ["succeeded", "pending"]
    [stopped] = stages["wide"]["shards"][1]["attempts"]
    assert stopped["finished_at"] is not None
    assert stopped["error"] == "stopped with the daemon; runs again when the run resumes"
    shown = chute("show", run_id)
    assert shown.code == 0, shown.err
    assert "running" not in shown.out
    assert "state stopped" in shown.out.splitlines()[0]
    listed = chute("runs", "--state", "stopped")
    assert listed.code == 0, listed.err
    assert [line.split()[:3] for line in listed.out.splitlines()[1:]] == [
        [run_id, "wide", "stopped"]
    ]
    gate.touch()
    d2 = daemon_factory(CONFIG).start()
    rec = final_run(spool, "incoming/wide.yaml")
    assert (rec["state"], rec["recoveries"]) == ("succeeded", 1)
    assert_settled(spool / "runs" / run_id)
    assert d2.stop() == 0


def test_a_stopped_run_cancelled_without_a_daemon_ends_with_its_stages_cancelled(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    d = daemon_factory(CONFIG).start()
    drop(spool, "wide.yaml", _wide(tmp_path / "go"))
    run_id = wait_for("shard 1 running, on disk", lambda: _shard_running_on_disk(spool))
    assert d.stop() == 0
    assert load_json(spool / "runs" / run_id / "run.json")["state"] == "stopped"
    done = chute("cancel", run_id)
    assert (done.code, done.out) == (0, f"{run_id} cancelled\n"), done.err
    assert assert_settled(spool / "runs" / run_id)["state"] == "cancelled"
    stages = _manifest(spool, run_id)
    assert [stages[n]["state"] for n in ("first", "wide", "after")] == [
        "succeeded",
        "cancelled",
        "cancelled",
    ]
    assert not (spool / "queue" / f"{run_id}.yaml").exists()


@pytest.mark.slow
def test_sigterm_with_on_restart_fail_ends_the_run_interrupted_at_once_and_for_good(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    config = CONFIG + "on_restart: fail\n"
    d = daemon_factory(config).start()
    drop(spool, "wide.yaml", _wide(gate))
    run_id = wait_for("shard 1 running, on disk", lambda: _shard_running_on_disk(spool))
    assert d.stop() == 0
    rec = assert_settled(spool / "runs" / run_id)
    assert rec["state"] == "interrupted"
    assert rec["error"] == "the daemon stopped during the run (on_restart: fail)"
    assert not (spool / "queue" / f"{run_id}.yaml").exists()
    stages = _manifest(spool, run_id)
    assert [stages[n]["state"] for n in ("first", "wide", "after")] == [
        "succeeded",
        "cancelled",
        "cancelled",
    ]
    assert [s["state"] for s in stages["wide"]["shards"]] == ["succeeded", "cancelled"]
    assert f"unfinished: {run_id}; they are over (interrupted; on_restart: fail)" in (
        d.log.read_text()
    )
    gate.touch()
    d2 = daemon_factory(CONFIG).start()  # on_restart: resume now; the run is over all the same
    drop(spool, "after.yaml", job("later", "true"))
    assert final_run(spool, "incoming/after.yaml")["state"] == "succeeded"
    assert assert_settled(spool / "runs" / run_id) == rec
    assert d2.stop() == 0


@pytest.mark.parametrize("on_restart", ["fail", "resume"])
@pytest.mark.slow
def test_a_kill_9_then_a_restart_settles_the_manifest_whatever_on_restart_says(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path, on_restart: str
) -> None:
    gate = tmp_path / "go"
    config = CONFIG + f"on_restart: {on_restart}\n"
    d = daemon_factory(config).start()
    drop(spool, "wide.yaml", _wide(gate))
    run_id = wait_for("shard 1 running, on disk", lambda: _shard_running_on_disk(spool))
    d.stop(signal.SIGKILL)
    assert _manifest(spool, run_id)["wide"]["state"] == "running"  # as the crash left it
    gate.touch()
    d2 = daemon_factory(config).start()
    rec = final_run(spool, "incoming/wide.yaml")
    assert assert_settled(spool / "runs" / run_id) == rec
    stages = _manifest(spool, run_id)
    if on_restart == "fail":
        assert (rec["state"], rec["recoveries"]) == ("interrupted", 0)
        assert [stages[n]["state"] for n in ("first", "wide", "after")] == [
            "succeeded",
            "cancelled",
            "cancelled",
        ]
        [left] = stages["wide"]["shards"][1]["attempts"]
        assert left["error"] == "the daemon stopped during the run (on_restart: fail)"
    else:
        assert (rec["state"], rec["recoveries"]) == ("succeeded", 1)
        assert {s["state"] for s in stages.values()} == {"succeeded"}
    assert d2.stop() == 0
