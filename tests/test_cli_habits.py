"""The CLI's habits a script relies on, through the real command: --version, --json
listings, cancelling by selector, log tails, durations and where the daemon listens."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import orjson

from conftest import EXAMPLES, REPO, Chute, chute_env, load_json
from daemon_proc import Daemon, daemon_factory, job

__all__ = ["daemon_factory"]  # a fixture, used by name


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chute", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=chute_env(env),
    )


def test_version_prints_the_version_the_package_and_its_metric_carry() -> None:
    from chute import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = _cli("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"chute {project}\n", "")
    assert __version__ == project
    assert "--version" in _cli("--help").stdout


def test_json_listings_without_a_daemon_keep_their_exit_codes(spool: Path, chute: Chute) -> None:
    status = chute("status", "--json")
    assert (status.code, orjson.loads(status.out)) == (3, None)
    submitted = chute("submit", str(EXAMPLES / "hello.yaml"), "--json")
    assert submitted.code == 0
    assert orjson.loads(submitted.out) == [
        {
            "file": str(EXAMPLES / "hello.yaml"),
            "incoming": "hello.yaml",
            "outcome": "waiting",
            "run_id": None,
            "schedule": None,
            "error": None,
        }
    ]
    assert [orjson.loads(chute(c, "--json").out) for c in ("runs", "schedules")] == [[], []]


def test_json_documents_of_submit_runs_status_and_schedules(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    daemon_factory().start()
    bad = tmp_path / "bad.yaml"
    bad.write_text(job("bad", "exit 3"))
    done = chute("submit", str(EXAMPLES / "hello.yaml"), str(bad), "--wait", "--json")
    assert done.code == 1, done.err
    report = orjson.loads(done.out)  # stdout is the document alone: no progress, no summary
    ids = [r["run_id"] for r in report]
    assert report == [
        {
            "file": str(EXAMPLES / "hello.yaml"),
            "incoming": "hello.yaml",
            "outcome": "run",
            "run_id": ids[0],
            "schedule": None,
            "error": None,
            "state": "succeeded",
            "exit_code": 0,
        },
        {
            "file": str(bad),
            "incoming": "bad.yaml",
            "outcome": "run",
            "run_id": ids[1],
            "schedule": None,
            "error": None,
            "state": "failed",
            "exit_code": 1,
        },
    ]
    scheduled = chute("submit", str(EXAMPLES / "nightly.yaml"), "--json")
    assert scheduled.code == 0
    assert [(r["outcome"], r["schedule"]) for r in orjson.loads(scheduled.out)] == [
        ("schedule", "nightly-cleanup")
    ]

    runs = chute("runs", "--json")
    assert runs.code == 0
    assert orjson.loads(runs.out) == [load_json(spool / "runs" / i / "run.json") for i in ids[::-1]]
    failed = chute("runs", "--json", "--state", "failed", "--limit", "5")
    assert [r["run_id"] for r in orjson.loads(failed.out)] == [ids[1]]

    status = chute("status", "--json")
    assert status.code == 0
    doc = orjson.loads(status.out)
    assert doc["spool"] == str(spool)
    assert set(doc) >= {"pid", "cpus", "runs", "tasks", "schedules"}

    schedules = chute("schedules", "--json")
    assert schedules.code == 0
    (entry,) = orjson.loads(schedules.out)
    assert (entry["name"], entry["trigger"]) == ("nightly-cleanup", "cron 0 2 * * * Asia/Shanghai")
    assert entry["next_fire"].endswith("T02:00:00+08:00")
