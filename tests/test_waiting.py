"""Why a run waits: memory, cpus, backfill's reservation, the node, a retry delay, a held
fire, a stopping daemon — in `chute status`, `chute show`, the API and the metrics, with
the real daemon."""

from __future__ import annotations

import contextlib
import http.client
import re
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Chute, load_json, tmpfs, wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, http_address, job, runs_of

__all__ = ["daemon_factory"]


def status(spool: Path) -> dict[str, Any]:
    path = spool / "state" / "status.json"
    return load_json(path) if path.exists() else {}  # type: ignore[no-any-return]


def waiting_for(spool: Path) -> dict[str, int]:
    return status(spool).get("tasks", {}).get("waiting_for", {})  # type: ignore[no-any-return]


def run_id(spool: Path, pipeline: str) -> str:
    [rec] = [r for r in runs_of(spool) if r["pipeline"] == pipeline]
    return str(rec["run_id"])


def table(lines: list[str], header: str) -> dict[str, list[str]]:
    """The rows of the table whose header starts with `header`, by their first cell."""
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) < 3:
            break
        rows[cells[0]] = cells[1:]
    return rows


def api(spool: Path, ref: str) -> dict[str, Any]:
    host, port = http_address(spool).rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", f"/api/v1/runs/{ref}")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        return orjson.loads(body)  # type: ignore[no-any-return]
    finally:
        conn.close()


def tasks_waiting(spool: Path) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{http_address(spool)}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "chute_tasks_waiting"
    }


def gated(gate: Path) -> str:
    return f"until test -e {gate}; do sleep 0.05; done"


@pytest.mark.slow
def test_a_run_waiting_for_memory_says_memory_in_status_show_api_and_metrics(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    """memory: 1GiB and two 600 MiB jobs on two cpus: the second waits for memory."""
    gate = tmp_path / "go"
    d = daemon_factory("cpus: 2\nmemory: 1GiB\n").start()
    for name in ("first", "second"):
        drop(
            spool,
            f"{name}.yaml",
            "apiVersion: chute/v1\nkind: Pipeline\n"
            f"metadata: {{name: {name}}}\nspec:\n  stages:\n"
            f"    - {{name: big, memory: 600MiB, run: '{gated(gate)}'}}\n"
            "    - {name: post, dependsOn: [big], run: 'true'}\n",
        )
    wait_for("a task waiting for memory", lambda: waiting_for(spool).get("memory") == 1, 15)
    first, second = run_id(spool, "first"), run_id(spool, "second")

    lines = chute("status").out.splitlines()
    assert lines[1] == "cpus: 1/2 allocated (node 0: 1/2); memory: 600MiB of 1GiB allocated"
    assert lines[2] == (
        "runs: 1 queued, 1 running; tasks: 1 running, 1 waiting (1 for memory); schedules: 0"
    )
    rows = table(lines, "RUN ")
    assert (rows[first][1], rows[first][3:]) == ("running", ["-", "-"])
    assert (rows[second][1], rows[second][3:]) == ("queued", ["memory", "1"])

    since = status(spool)["waiting"][0]["since"]
    shown = chute("show", second).out.splitlines()
    assert shown[1] == f"waiting for memory since {since}, #1 in the queue"
    stages = table(shown, "STAGE ")
    assert stages["big"] == [
        "waiting",
        "0",
        "-",
        "-",
        "memory (needs 600MiB, 424MiB of 1GiB free)",
    ]
    assert stages["post"] == ["pending", "0", "-", "-", "dependency: big"]
    assert table(chute("show", first).out.splitlines(), "STAGE ")["post"][-1] == "dependency: big"

    assert api(spool, second)["waiting"] == {"for": "memory", "since": since, "position": 1}
    assert api(spool, first)["waiting"] is None
    metrics = tasks_waiting(spool)
    assert (metrics["memory"], metrics["cpus"], sum(metrics.values())) == (1, 0, 1)

    gate.touch()
    for name in ("first", "second"):
        assert final_run(spool, f"incoming/{name}.yaml")["state"] == "succeeded"
    wait_for("nothing waiting", lambda: sum(tasks_waiting(spool).values()) == 0)
    assert api(spool, second)["waiting"] is None
    assert d.stop() == 0


@pytest.mark.slow
def test_cpus_a_retry_delay_a_schedule_a_held_fire_and_a_stopping_daemon(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    d = daemon_factory("cpus: 1\n").start()
    drop(spool, "flaky.yaml", job("flaky", "exit 3", "  retries: {max: 1, delay: 1h}\n"))
    wait_for("a retry delay", lambda: status(spool).get("tasks", {}).get("retrying") == 1, 15)
    drop(spool, "gated.yaml", job("gated", gated(gate)))
    wait_for("the gated run", lambda: any(r["state"] == "running" for r in runs_of(spool)))
    drop(spool, "after.yaml", job("after", "true"))
    drop(spool, "tick.yaml", job("tick", "true", "  schedule: {every: 1s, overlap: queue}\n"))
    wait_for("a held fire", lambda: status(spool).get("held"), 15)
    wait_for("two tasks waiting for cpus", lambda: waiting_for(spool).get("cpus") == 2, 15)
    st = status(spool)
    [tick] = [r["run_id"] for r in runs_of(spool) if r["pipeline"] == "tick"]
    [held] = st["held"]
    assert (held["schedule"], held["for"], held["behind"]) == ("tick", "held", [tick])

    lines = chute("status").out.splitlines()
    assert lines[2] == (
        "runs: 2 queued, 2 running; tasks: 1 running, 2 waiting (2 for cpus), 1 waiting out "
        "a retry delay; schedules: 1"
    )
    assert lines[3].startswith("next fire: schedule tick at ")
    assert lines[4] == (
        f"held: schedule tick fire {held['fire_time']} (run {held['run_id']}) waits for "
        f"{tick} to end (overlap: queue)"
    )
    rows = table(lines, "RUN ")
    assert rows[run_id(spool, "after")][3:] == ["cpus", "1"]
    assert rows[tick][3:] == ["cpus", "2"]
    assert rows[run_id(spool, "flaky")][3:] == ["retry", "-"]

    flaky = chute("show", "flaky/latest").out.splitlines()
    assert flaky[1].startswith("waiting for retry since ")
    assert table(flaky, "STAGE ")["flaky"][-1].startswith("retry (at ")
    after = table(chute("show", "after/latest").out.splitlines(), "STAGE ")
    assert after["after"][-1] == "cpus (needs 1, 0 of 1 free)"

    assert chute("unschedule", "tick").code == 0
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)  # the gated task keeps it up; nothing new starts
    wait_for("tasks waiting on the stop", lambda: waiting_for(spool).get("stopping") == 2, 15)
    assert "2 waiting (2 for stopping)" in chute("status").out.splitlines()[2]
    gate.touch()
    assert d.stop() == 0


@pytest.mark.slow
def test_backfill_s_reservation_and_a_node_made_too_small_by_a_reload(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    d = daemon_factory("cpus: 2\npolicy: backfill\n").start()
    drop(spool, "long.yaml", job("long", gated(gate), "  timeout: 1h\n"))
    wait_for("the long run", lambda: any(r["state"] == "running" for r in runs_of(spool)))
    drop(spool, "wide.yaml", job("wide", "true", "  cpus: 2\n  timeout: 1m\n"))
    drop(spool, "endless.yaml", job("endless", "true"))  # no timeout: not before the head
    wait_for("a task held back", lambda: waiting_for(spool).get("backfill") == 1, 15)
    rows = table(chute("status").out.splitlines(), "RUN ")
    assert rows[run_id(spool, "wide")][3:] == ["cpus", "1"]
    assert rows[run_id(spool, "endless")][3:] == ["backfill", "2"]
    endless = table(chute("show", "endless/latest").out.splitlines(), "STAGE ")
    assert endless["endless"][-1] == "backfill (what it fits in is held for the head of the queue)"

    assert chute("cancel", "endless/latest").code == 0
    d.config.write_text("cpus: 1\npolicy: backfill\nhttp: {listen: 127.0.0.1:0}\n")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for("a task bigger than the node", lambda: waiting_for(spool).get("node") == 1, 15)
    wide = table(chute("show", "wide/latest").out.splitlines(), "STAGE ")
    assert wide["wide"][-1] == "node (asks for 2 cpus, the node has 1)"
    assert chute("cancel", "wide/latest").code == 0
    gate.touch()
    assert final_run(spool, "incoming/long.yaml")["state"] == "succeeded"
    assert d.stop() == 0


@pytest.mark.slow
def test_show_of_a_run_behind_the_first_200_says_so_and_the_api_gives_its_place(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    d = daemon_factory("cpus: 1\n").start()
    drop(spool, "gated.yaml", job("gated", gated(gate)))
    wait_for("the gated run", lambda: any(r["state"] == "running" for r in runs_of(spool)))
    for i in range(202):
        drop(spool, f"w{i:03d}.yaml", job(f"w{i:03d}", "true"))
    wait_for("202 runs waiting", lambda: status(spool).get("waiting_runs") == 202, 30)
    st = status(spool)
    assert (len(st["waiting"]), st["tasks"]["waiting_for"]["cpus"]) == (200, 202)
    last = run_id(spool, "w201")
    assert chute("show", last).out.splitlines()[1] == (
        "waiting: behind the first 200 runs in the queue"
    )
    assert api(spool, last)["waiting"]["position"] == 202
    gate.touch()
    wait_for("all done", lambda: status(spool).get("waiting_runs") == 0, 60)
    assert d.stop() == 0


@pytest.mark.slow
def test_tasks_held_back_by_a_full_disk_wait_for_disk(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    with tmpfs(spool, "size=16m"):
        d = daemon_factory("cpus: 1\n").start()
        drop(spool, "gated.yaml", job("gated", gated(gate)))
        wait_for("the gated run", lambda: any(r["state"] == "running" for r in runs_of(spool)))
        for name in ("next", "last"):
            drop(spool, f"{name}.yaml", job(name, "true"))
        wait_for("two tasks waiting for cpus", lambda: tasks_waiting(spool)["cpus"] == 2, 15)
        with open(spool / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:  # until ENOSPC
                f.write(b"\0" * (1 << 20))
                f.flush()
        # The gated task's core goes to the next task at once; their ends cannot be
        # written: the engine pauses, and the last task waits for the disk.
        gate.touch()
        wait_for("a task waiting for disk", lambda: tasks_waiting(spool)["disk"] == 1, 30)
        assert api(spool, run_id(spool, "last"))["waiting"]["for"] == "disk"
        (spool / "filler").unlink()
        for name in ("gated", "next", "last"):
            assert final_run(spool, f"incoming/{name}.yaml", 30)["state"] == "succeeded"
        assert d.stop() == 0
