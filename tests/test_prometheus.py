"""The shipped dashboard through a real Prometheus server scraping a real daemon: every query
returns data, and every percentile panel is within 25% of what the run folders say.

The workload: runs of `sleep` spread from 0.1 s to 2 s (a fifth of them failing), all
dropped at once on two CPUs, so runs wait in the queue and intake takes them in batches,
plus two rejected files. The truth comes from run.json and manifest.json (durations,
acceptance and start times) and from the test's own clock for each file's drop.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from chute.clock import parse_rfc3339
from conftest import REPO, load_json, wait_for
from daemon_proc import Daemon, daemon_factory, http_address, job, runs_of

__all__ = ["daemon_factory"]

DASHBOARD = REPO / "grafana" / "chute-dashboard.json"
RUNS = 60
TOLERANCE = 0.25
MS = 0.003  # run.json times are milliseconds: a few of them is the floor of any comparison

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus is not installed (.ci/run installs the Debian package)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """`start(target)`: a Prometheus scraping `target` every second; returns its URL."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[BinaryIO] = []

    def start(target: str) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: chute\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed at teardown
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=log,
            )
        )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for("prometheus to be ready", ready, timeout=60)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for log in logs:
        log.close()


def query(url: str, expr: str, at: float) -> list[dict[str, Any]]:
    args = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    with urllib.request.urlopen(f"{url}/api/v1/query?{args}", timeout=30) as resp:
        doc = json.load(resp)
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


def query_range(url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    """The series of `expr` with at least one value, evaluated every second in [start, end]."""
    args = urllib.parse.urlencode(
        {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"}
    )
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{args}", timeout=30) as resp:
        doc = json.load(resp)
    assert doc["status"] == "success", doc
    return [s for s in doc["data"]["result"] if s["values"]]


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between the sorted values."""
    xs = sorted(values)
    rank = q * (len(xs) - 1)
    low = int(rank)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (rank - low)


def seconds(a: str, b: str) -> float:
    return (parse_rfc3339(b) - parse_rfc3339(a)).total_seconds()


def test_every_dashboard_query_answers_and_its_percentiles_tell_the_truth(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon], prometheus: Any
) -> None:
    d = daemon_factory("cpus: 2\n").start()
    url = prometheus(http_address(spool))
    began = time.time()
    wait_for(
        "a first scrape",
        lambda: query(url, 'up{job="chute"}', time.time()) != [],
        timeout=60,
    )
    staging = tmp_path / "staging"
    staging.mkdir()
    for i in range(RUNS):
        length = 0.1 + 1.9 * ((i * 37) % RUNS) / RUNS  # spread, in an order unlike the drops
        tail = "; exit 1" if i % 5 == 4 else ""
        (staging / f"s{i:02d}.yaml").write_text(job(f"s{i:02d}", f"sleep {length:.2f}{tail}"))
    (staging / "bad.yaml").write_text("kind: Job\n")
    (staging / "bad.txt").write_text("not a spec\n")
    dropped: dict[str, float] = {}
    for path in sorted(staging.iterdir()):
        dropped[f"incoming/{path.name}"] = time.time()
        path.rename(spool / "incoming" / path.name)

    def finished() -> list[dict[str, Any]] | None:
        runs = runs_of(spool)
        final = [r for r in runs if r["state"] in ("succeeded", "failed")]
        return final if len(final) == RUNS else None

    runs = wait_for("every run to end", finished, timeout=240)
    wait_for(
        "a scrape that saw every run end",
        lambda: [
            r
            for r in query(url, 'sum(chute_runs_finished_total{job="chute"})', time.time())
            if float(r["value"][1]) == RUNS
        ],
        timeout=30,
    )
    at = time.time()
    assert d.stop() == 0
    window = f"{int(at - began) + 30}s"

    truth = {
        "run": [float(r["duration_seconds"]) for r in runs],
        "stage": [
            float(s["duration_seconds"])
            for r in runs
            for s in load_json(spool / "runs" / r["run_id"] / "manifest.json")["stages"]
        ],
        "queue": [seconds(r["created_at"], r["started_at"]) for r in runs],
        "intake": [
            parse_rfc3339(r["created_at"]).timestamp() - dropped[r["trigger"]["source"]]
            for r in runs
        ],
    }
    metric_of = {
        "chute_run_duration_seconds": "run",
        "chute_stage_duration_seconds": "stage",
        "chute_queue_wait_seconds": "queue",
        "chute_intake_latency_seconds": "intake",
    }
    doc = json.loads(DASHBOARD.read_text())
    checked: list[str] = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$__rate_interval", window)
                .replace("$job", "chute")
                .replace("$instance", ".*")
            )
            seen = query_range(url, expr.replace(window, "5s"), began, at)
            assert seen, f"{panel['title']}: {expr} returned no data"
            result = query(url, expr, at)
            found = re.search(r"histogram_quantile\(([0-9.]+), .*\b(chute_[a-z_]+)_bucket", expr)
            if found is None:
                continue
            q, family = float(found.group(1)), found.group(2)
            [series] = result
            shown = float(series["value"][1])
            real = quantile(truth[metric_of[family]], q)
            assert abs(shown - real) <= max(TOLERANCE * real, MS), (
                f"{panel['title']} p{q * 100:g}: Prometheus says {shown:.4f}s, "
                f"the run folders {real:.4f}s"
            )
            checked.append(f"{family} p{q * 100:g}")
    assert len(checked) == 8, checked
    rejected = query(url, 'sum(chute_files_rejected_total{job="chute"})', at)
    assert float(rejected[0]["value"][1]) == 2
