"""Metrics: the registry alone, then a real daemon's /metrics after real jobs, promtool, Grafana."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chute.observe.metrics import INTAKE_BUCKETS, QUEUE_BUCKETS, RUN_BUCKETS, Metrics, Snapshot
from chute.store import rundir
from conftest import REPO, wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, http_address, job

__all__ = ["daemon_factory"]

DASHBOARD = REPO / "grafana" / "chute-dashboard.json"
EXPECTED_NAMES = {
    "chute_files_accepted_total",
    "chute_files_rejected_total",
    "chute_runs_finished_total",
    "chute_run_duration_seconds_bucket",
    "chute_stage_duration_seconds_bucket",
    "chute_queue_depth",
    "chute_tasks_running",
    "chute_tasks_waiting",
    "chute_cpus",
    "chute_cpus_allocated",
    "chute_intake_latency_seconds_bucket",
    "chute_queue_wait_seconds_bucket",
    "chute_spool_write_failing",
    "chute_schedule_fires_total",
    "chute_schedule_misfires_total",
    "chute_retries_total",
    "chute_cache_hits_total",
    "chute_build_info",
    "chute_start_time_seconds",
    "chute_inotify_overflows_total",
    "chute_spool_write_errors_total",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap: Samples, name: str, **labels: str) -> float:
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text: str = resp.read().decode()
        return text


# -- the registry alone ----------------------------------------------------------------------


def test_every_metric_exists_before_anything_happens() -> None:
    m = Metrics(version="9.9.9", start_time=1234.5)
    snap = samples(generate_latest(m.registry).decode())
    per_node = {"chute_cpus", "chute_cpus_allocated"}  # no nodes until the loop publishes
    assert EXPECTED_NAMES - per_node <= {name for name, _ in snap}
    assert value(snap, "chute_build_info", version="9.9.9", python=_python()) == 1
    assert value(snap, "chute_start_time_seconds") == 1234.5
    assert value(snap, "chute_files_rejected_total", reason="world_writable") == 0


def test_runs_finished_has_a_series_for_each_final_run_state_and_none_for_stopped() -> None:
    snap = samples(generate_latest(Metrics(version="0", start_time=0).registry).decode())
    states = {dict(labels)["state"] for name, labels in snap if name == "chute_runs_finished_total"}
    assert states == set(rundir.FINAL_RUN_STATES)
    assert "stopped" in rundir.RUN_STATES  # a run the next start resumes has not finished


def test_engine_gauges_come_from_the_published_snapshot() -> None:
    m = Metrics(version="0", start_time=0)
    m.publish(
        Snapshot(
            queue_depth=7,
            tasks_running=3,
            tasks_waiting=(("cpus", 2), ("memory", 1)),
            cpus_total=(64, 64),
            cpus_allocated=(5, 1),
        )
    )
    snap = samples(generate_latest(m.registry).decode())
    assert value(snap, "chute_queue_depth") == 7
    assert value(snap, "chute_tasks_running") == 3
    assert value(snap, "chute_tasks_waiting", reason="cpus") == 2
    assert value(snap, "chute_tasks_waiting", reason="memory") == 1
    assert value(snap, "chute_tasks_waiting", reason="backfill") == 0  # every reason exported
    assert value(snap, "chute_cpus", numa_node="1") == 64
    assert value(snap, "chute_cpus_allocated", numa_node="0") == 5
    assert value(snap, "chute_cpus_allocated", numa_node="1") == 1


def test_intake_latency_queue_wait_and_durations_are_observed_in_seconds() -> None:
    m = Metrics(version="0", start_time=0)
    m.file_accepted(dropped_at=100.0, accepted_at=100.0035)
    m.file_accepted()  # a schedule file: no run to measure
    m.file_accepted(dropped_at=None, accepted_at=100.0)  # no drop time known (a claim's restart)
    m.run_started(accepted=100.0, wall=130.0)
    m.run_finished("succeeded", 42.0)
    m.stage_finished(0.3)
    snap = samples(generate_latest(m.registry).decode())
    assert value(snap, "chute_files_accepted_total") == 3
    assert value(snap, "chute_intake_latency_seconds_count") == 1
    assert value(snap, "chute_intake_latency_seconds_bucket", le="0.003") == 0
    assert value(snap, "chute_intake_latency_seconds_bucket", le="0.004") == 1
    assert value(snap, "chute_queue_wait_seconds_count") == 1
    assert value(snap, "chute_queue_wait_seconds_bucket", le="25.0") == 0
    assert value(snap, "chute_queue_wait_seconds_bucket", le="30.0") == 1
    assert value(snap, "chute_run_duration_seconds_bucket", le="50.0") == 1
    assert value(snap, "chute_run_duration_seconds_bucket", le="40.0") == 0
    assert value(snap, "chute_stage_duration_seconds_bucket", le="0.3") == 1
    assert value(snap, "chute_stage_duration_seconds_bucket", le="0.25") == 0


def test_buckets_resolve_a_quantile_within_a_third_from_milliseconds_to_a_day() -> None:
    for buckets, low, high in (
        (RUN_BUCKETS, 0.01, 86_400),
        (INTAKE_BUCKETS, 0.0001, 60),
        (QUEUE_BUCKETS, 0.001, 86_400),
    ):
        assert buckets == tuple(sorted(set(buckets)))
        assert buckets[0] <= low
        assert buckets[-1] >= high
        assert max(b / a for a, b in itertools.pairwise(buckets)) <= 4 / 3 + 1e-9
        assert len(buckets) <= 90  # series per histogram: no labels, so this is all of them


def test_the_process_is_described_and_no_created_series_is_exported() -> None:
    m = Metrics(version="0", start_time=0)
    names = {name for name, _ in samples(generate_latest(m.registry).decode())}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= names
    assert "process_open_fds" in names
    assert not [n for n in names if n.endswith("_created")]


def test_spool_write_failing_is_a_gauge_and_each_new_error_counts_once() -> None:
    m = Metrics(version="0", start_time=0)
    for failing, newly in ((True, True), (True, False), (False, False), (True, True)):
        m.spool_writes(failing, newly)
    snap = samples(generate_latest(m.registry).decode())
    assert value(snap, "chute_spool_write_failing") == 1
    assert value(snap, "chute_spool_write_errors_total") == 2
    m.spool_writes(False, False)
    snap = samples(generate_latest(m.registry).decode())
    assert value(snap, "chute_spool_write_failing") == 0


def _python() -> str:
    import platform

    return platform.python_version()


# -- a real daemon -----------------------------------------------------------------------------


@pytest.fixture
def scraped(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> tuple[str, Samples]:
    """A daemon after five accepted jobs (one failing, one retried, one a cache hit of an
    earlier one) and one rejected file; its /metrics text once everything settled."""
    d = daemon_factory("cpus: 2\n").start()
    marker = tmp_path / "flaky-marker"
    cached = job("cached", "echo 1 > $CHUTE_OUTPUT", "  cache: true\n")
    drop(spool, "ok.yaml", job("ok", "true"))
    drop(spool, "bad.yaml", job("bad", "exit 3"))
    drop(
        spool,
        "flaky.yaml",
        job(
            "flaky",
            f"test -e {marker} || {{ touch {marker}; exit 1; }}",
            "  retries: {max: 1, delay: 100ms}\n",
        ),
    )
    drop(spool, "cache1.yaml", cached)
    assert final_run(spool, "incoming/cache1.yaml")["state"] == "succeeded"
    drop(spool, "cache2.yaml", cached)
    drop(spool, "invalid.yaml", "apiVersion: chute/v1\nkind: Job\nmetadata: {name: x}\nspec: {}\n")
    assert final_run(spool, "incoming/ok.yaml")["state"] == "succeeded"
    assert final_run(spool, "incoming/bad.yaml")["state"] == "failed"
    assert final_run(spool, "incoming/flaky.yaml")["state"] == "succeeded"
    assert final_run(spool, "incoming/cache2.yaml")["state"] == "succeeded"
    wait_for("the rejection", lambda: (spool / "rejected" / "invalid.yaml.error.json").exists())
    address = http_address(spool)

    def settled() -> tuple[str, Samples] | None:
        text = scrape(address)
        snap = samples(text)
        done = value(snap, "chute_run_duration_seconds_count") == 5
        idle = value(snap, "chute_tasks_running") == 0 and value(snap, "chute_queue_depth") == 0
        return (text, snap) if done and idle else None

    result: tuple[str, Samples] = wait_for("the counters to settle", settled)
    assert d.stop() == 0
    return result


def test_counters_and_histograms_count_what_the_daemon_did(
    scraped: tuple[str, Samples],
) -> None:
    _, snap = scraped
    assert {name for name, _ in snap} >= EXPECTED_NAMES
    assert value(snap, "chute_files_accepted_total") == 5
    assert value(snap, "chute_files_rejected_total", reason="invalid") == 1
    assert sum(v for (n, _), v in snap.items() if n == "chute_files_rejected_total") == 1
    assert value(snap, "chute_runs_finished_total", state="succeeded") == 4
    assert value(snap, "chute_runs_finished_total", state="failed") == 1
    assert value(snap, "chute_runs_finished_total", state="cancelled") == 0
    assert value(snap, "chute_run_duration_seconds_count") == 5
    # ok, bad, flaky and the first cached run ran their stage; the cache hit did not
    assert value(snap, "chute_stage_duration_seconds_count") == 4
    assert value(snap, "chute_intake_latency_seconds_count") == 5  # every run's file
    assert value(snap, "chute_intake_latency_seconds_bucket", le="10.0") == 5
    assert value(snap, "chute_queue_wait_seconds_count") == 4  # the cache hit starts no task
    assert value(snap, "chute_spool_write_failing") == 0
    assert value(snap, "chute_retries_total") == 1
    assert value(snap, "chute_cache_hits_total") == 1
    assert value(snap, "chute_schedule_fires_total") == 0
    assert value(snap, "chute_schedule_misfires_total") == 0
    assert value(snap, "chute_spool_write_errors_total") == 0
    assert value(snap, "chute_cpus", numa_node="0") == 2
    assert value(snap, "chute_cpus_allocated", numa_node="0") == 0
    assert sum(v for (name, _), v in snap.items() if name == "chute_tasks_waiting") == 0


def test_promtool_finds_nothing_to_say_about_a_live_scrape(
    scraped: tuple[str, Samples],
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs the prometheus package)")
    text, _ = scraped
    p = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_every_grafana_panel_queries_metrics_that_exist(scraped: tuple[str, Samples]) -> None:
    _, snap = scraped
    names = {name for name, _ in snap}
    doc = orjson.loads(DASHBOARD.read_bytes())
    assert doc["__inputs"][0]["name"] == "DS_PROMETHEUS"
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        used = set(re.findall(r"\b(?:chute|process)_[a-z_]+", expr))
        assert used or expr.startswith("up{"), expr
        assert used <= names, f"{expr}: {sorted(used - names)} not in a live scrape"
        assert 'job=~"$job", instance=~"$instance"' in expr, f"{expr}: a fleet would merge"
    assert [v["name"] for v in doc["templating"]["list"]] == ["job", "instance"]
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for word in ("queue", "numa", "intake", "reject", "schedule", "stage", "outcome"):
        assert word in titles
