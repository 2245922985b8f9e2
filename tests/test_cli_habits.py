"""The CLI's habits a script relies on, through the real command: --version, --json
listings, cancelling by selector, log tails, durations and where the daemon listens."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen

import orjson
import pytest

from conftest import EXAMPLES, REPO, Chute, chute_env, load_json, wait_for
from daemon_proc import Daemon, daemon_factory, http_address, job

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


@pytest.mark.slow
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


def _states(spool: Path) -> dict[str, tuple[str, str]]:
    """run id -> (pipeline, state), from each run.json."""
    out = {}
    for path in (spool / "runs").glob("2*/run.json"):
        rec = load_json(path)
        out[path.parent.name] = (rec["pipeline"], rec["state"])
    return out


@pytest.mark.slow
def test_cancel_by_selector_cancels_each_run_it_selects_and_no_other(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    daemon_factory("cpus: 1\n").start()
    files = []
    for name, pipeline in (("a1", "alpha"), ("a2", "alpha"), ("a3", "alpha"), ("b1", "beta")):
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(job(pipeline, "sleep 60"))
    assert chute("submit", *map(str, files)).code == 0

    def settled() -> dict[str, tuple[str, str]] | None:
        states = _states(spool)
        counts = sorted(s for _, s in states.values())
        return states if counts == ["queued", "queued", "queued", "running"] else None

    before = wait_for("one run running, three queued", settled, timeout=30)
    running = next(i for i, (_, s) in before.items() if s == "running")
    queued_alpha = sorted(i for i, (p, s) in before.items() if (p, s) == ("alpha", "queued"))

    done = chute("cancel", "--pipeline", "alpha", "--state", "queued")
    assert (done.code, done.err) == (0, "")
    assert done.out == "".join(f"{i} cancelled\n" for i in queued_alpha)
    after = _states(spool)
    assert {i for i, (_, s) in after.items() if s == "cancelled"} == set(queued_alpha)

    done = chute("cancel", "--state", "running")
    assert (done.code, done.out) == (0, f"{running} cancelled\n")

    rest = sorted(i for i, (_, s) in _states(spool).items() if s not in ("cancelled",))
    done = chute("cancel", queued_alpha[0], *rest)
    assert done.code == 0
    lines = done.out.splitlines()
    assert f"{queued_alpha[0]} already cancelled" in lines
    assert all(f"{i} cancelled" in lines for i in rest)
    assert {s for _, s in _states(spool).values()} == {"cancelled"}

    nothing = chute("cancel", "--pipeline", "alpha")
    assert (nothing.code, nothing.out) == (0, "no run left to cancel matches --pipeline alpha\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [],
            "chute cancel: name a run (RUN...), or select runs with --pipeline NAME and/or "
            "--state queued|running",
        ),
        (
            ["--state", "done"],
            "--state: 'done' is not a state cancel selects by; choose queued or running",
        ),
        (
            ["--pipeline", "../x"],
            "../x: not a pipeline name; a name of lowercase letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 63), like nightly-etl",
        ),
    ],
    ids=["nothing", "unknown-state", "bad-pipeline-name"],
)
def test_cancel_refuses_no_selection_an_unknown_state_and_a_bad_name(
    spool: Path, chute: Chute, args: list[str], message: str
) -> None:
    done = chute("cancel", *args)
    assert (done.code, done.out, done.err) == (2, "", message + "\n")


def test_cancel_without_a_daemon_cancels_each_selected_run(spool: Path, chute: Chute) -> None:
    ids = [f"20261122_10150{i}_000000" for i in range(3)]
    for run_id, pipeline in zip(ids, ("victim", "victim", "other"), strict=True):
        folder = spool / "runs" / run_id
        folder.mkdir(parents=True)
        (folder / "spec.yaml").write_text(job(pipeline, "true"))
        (folder / "run.json").write_bytes(
            orjson.dumps(
                {
                    "run_id": run_id,
                    "pipeline": pipeline,
                    "kind": "Job",
                    "state": "queued",
                    "trigger": {"type": "drop"},
                    "created_at": "2026-11-22T10:15:00.000Z",
                    "finished_at": None,
                }
            )
        )
        (spool / "queue").mkdir(exist_ok=True)
        (spool / "queue" / f"{run_id}.yaml").write_text("waiting")
    done = chute("cancel", "--pipeline", "victim")
    assert (done.code, done.out) == (0, f"{ids[0]} cancelled\n{ids[1]} cancelled\n")
    assert [_states(spool)[i][1] for i in ids] == ["cancelled", "cancelled", "queued"]
    assert sorted(p.stem for p in (spool / "queue").iterdir()) == [ids[2]]


@pytest.mark.slow
def test_logs_tail_and_since_select_lines_and_attempts(
    chute: Chute, spool: Path, tmp_path: Path
) -> None:
    flaky = tmp_path / "flaky.yaml"
    flaky.write_text(
        job(
            "flaky",
            "n=$(cat count 2>/dev/null || echo 0); echo $((n + 1)) > count; "
            'echo "try $n one"; echo "try $n two"; [ "$n" -ge 2 ]',
            "  retries: {max: 2, delay: 1s}\n",
        )
    )
    ran = chute("run", str(flaky))
    assert ran.code == 0, ran.err
    log = (spool / "runs" / "latest" / "stages" / "flaky" / "log").read_text()
    headers = re.findall(r"^--- chute: attempt (\d) at (\S+) ---$", log, re.MULTILINE)
    assert [n for n, _ in headers] == ["2", "3"]
    third = log[log.index("--- chute: attempt 3") :]
    second = log[log.index("--- chute: attempt 2") :]

    def out(*args: str) -> str:
        done = chute("logs", "latest", "flaky", *args)
        assert (done.code, done.err) == (0, ""), done.err
        return done.out

    assert out("-n", "2") == "try 2 one\ntry 2 two\n"
    assert out("-n", "0") == ""
    assert out("--since", headers[1][1]) == third
    assert out("--since", headers[0][1]) == second
    # the first attempt started (manifest) before the second's header: a time between them
    started = load_json(spool / "runs" / "latest" / "manifest.json")["stages"][0]["attempts"][0]
    assert out("--since", started["started_at"]) == log
    assert out("--since", "1h") == log
    assert out("--since", "1h", "-n", "1") == "try 2 two\n"
    assert out("--since", "2099-01-01T00:00:00Z") == ""
    whole = chute("logs", "latest", "--since", headers[1][1], "-n", "3")
    assert whole.out == "==> flaky <==\n" + "".join(third.splitlines(keepends=True)[-3:])

    bad = chute("logs", "latest", "--since", "soon")
    assert (bad.code, bad.out) == (2, "")
    assert bad.err == (
        "--since: 'soon' is neither a duration like 500ms, 30s, 20m, 1h or 2d nor a time like "
        "2026-12-07T21:50:00Z (local time without an offset)\n"
    )
    negative = chute("logs", "latest", "-n", "-1")
    assert (negative.code, negative.err) == (2, "-n: -1 is not a count of lines; give 0 or more\n")


def test_compound_durations_in_a_spec_and_the_config(tmp_path: Path, chute: Chute) -> None:
    spec = tmp_path / "long.yaml"
    spec.write_text(
        job("long", "true", "  timeout: 1h30m\n  retries: {max: 1, delay: 90min}\n")
        + "  schedule: {every: 1d12h}\n"
    )
    config = tmp_path / "chute.yaml"
    config.write_text("kill_grace: 1m30s\nretention: {max_age: 2w}\n")
    done = chute("validate", str(spec), "--config", str(config))
    assert (done.code, done.err) == (0, "")
    assert done.out.startswith(f"{spec}: ok: Job long, 1 stage, scheduled (every 36h)\n")

    spec.write_text(job("long", "true", "  timeout: 2h 30m\n"))
    config.write_text("kill_grace: 1m 30s\n")
    rule = (
        "a compound duration has whole numbers, no spaces, units from the largest down (w, d, "
        "h, m or min, s, ms), each once, and each part after the first less than one of the "
        "unit before it, like 1h30m or 1d12h"
    )
    bad_spec = chute("validate", str(spec))
    assert (bad_spec.code, bad_spec.err) == (
        2,
        f"{spec}:6: spec.timeout: '2h 30m' is not a duration like 500ms, 30s, 20m, 1h or 2d: "
        f"{rule}\n",
    )
    bad_config = chute("validate", str(EXAMPLES / "hello.yaml"), "--config", str(config))
    assert (bad_config.code, bad_config.err) == (
        2,
        f"{config}: kill_grace: '1m 30s' is not a duration like 500ms, 30s, 20m, 1h or 2d: "
        f"{rule}\n",
    )


def test_json_log_lines_of_chute_run_carry_run_stage_and_state(
    spool: Path, tmp_path: Path, chute: Chute
) -> None:
    config = tmp_path / "chute.yaml"
    config.write_text("log_format: json\n")
    done = chute("run", str(EXAMPLES / "hello.yaml"), "--config", str(config))
    assert done.code == 0, done.err
    lines = [orjson.loads(line) for line in done.err.splitlines()]
    run_id = (spool / "runs" / "latest").readlink().name
    for doc in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"]), doc
    fields = [{k: d.get(k) for k in ("run_id", "stage", "state")} for d in lines]
    assert {"run_id": run_id, "stage": None, "state": None} in fields  # run started
    assert {"run_id": run_id, "stage": "hello", "state": "succeeded"} in fields
    assert all(d["message"].startswith(run_id) for d in lines if d.get("run_id"))


def test_json_log_lines_of_the_daemon_carry_run_stage_and_state(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    daemon = daemon_factory("log_format: json\n").start()
    done = chute("submit", str(EXAMPLES / "hello.yaml"), "--wait")
    assert done.code == 0, done.err
    run_id = (spool / "runs" / "latest").readlink().name

    def finished() -> list[dict[str, object]] | None:
        lines = [orjson.loads(x) for x in daemon.log.read_text().splitlines()]
        ends = [d for d in lines if d.get("run_id") == run_id and "stage" not in d]
        return lines if any(d.get("state") == "succeeded" for d in ends) else None

    lines = wait_for("the run's finished line", finished)
    assert any(
        (d.get("run_id"), d.get("stage"), d.get("state")) == (run_id, "hello", "succeeded")
        for d in lines
    )
    assert all(re.fullmatch(r"[-0-9]{10}T[:0-9]{8}\.[0-9]{3}Z", str(d["time"])) for d in lines)


def _daemon(
    spool: Path, config: Path, *args: str, env: dict[str, str] | None = None
) -> Popen[bytes]:
    log = open(spool.parent / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "chute", "daemon", "--spool", str(spool), "--config", str(config),
         *args],
        env=chute_env(env),
        stdout=log,
        stderr=log,
    )  # fmt: skip
    log.close()
    return proc


@pytest.mark.parametrize(
    ("args", "env", "host"),
    [
        ([], {}, "127.0.0.1"),
        ([], {"CHUTE_LISTEN": "127.0.0.2:0"}, "127.0.0.2"),
        (["--listen", "127.0.0.3:0"], {"CHUTE_LISTEN": "127.0.0.2:0"}, "127.0.0.3"),
    ],
    ids=["config", "env-over-config", "option-over-env"],
)
def test_listen_option_over_env_over_config_and_through_a_reload(
    spool: Path, tmp_path: Path, args: list[str], env: dict[str, str], host: str
) -> None:
    config = tmp_path / "chute.yaml"
    config.write_text("http: {listen: '127.0.0.1:0'}\n")
    proc = _daemon(spool, config, *args, env=env)
    try:
        assert http_address(spool).startswith(f"{host}:")
        proc.send_signal(signal.SIGHUP)
        log = spool.parent / "daemon.log"
        wait_for("the reload", lambda: "config reloaded" in log.read_text())
        assert "changed: takes effect after a restart" not in log.read_text()
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--listen", "nowhere"], {}, "--listen: 'nowhere' is not host:port"),
        ([], {"CHUTE_LISTEN": "localhost"}, "CHUTE_LISTEN: 'localhost' is not host:port"),
    ],
    ids=["option", "env"],
)
def test_a_bad_listen_address_is_named_by_where_it_was_given(
    spool: Path, tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    config = tmp_path / "chute.yaml"
    config.write_text("http: {listen: '127.0.0.1:0'}\n")
    done = _cli("daemon", "--spool", str(spool), "--config", str(config), *args, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        f"{message} (e.g. 127.0.0.1:9842, [::1]:9842)\n",
    )
    assert not (spool / "state").exists()


def test_every_positional_argument_of_every_command_has_help() -> None:
    from chute.cli.parser import _parser

    parser = _parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        (name, a.dest)
        for name, sub in commands.choices.items()
        for a in sub._actions
        if not a.option_strings and not a.help
    ]
    assert missing == []
