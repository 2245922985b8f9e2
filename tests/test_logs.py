"""Log lines: journald-friendly under systemd, JSON lines on request, a summary per run."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest

from chute.observe import logs
from conftest import EXAMPLES, chute_env


def run_chute(spool: Path, *args: str, env: dict[str, str] | None = None) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "chute", *args, "--spool", str(spool)],
        env=chute_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return p.stderr


def test_under_journald_lines_carry_a_priority_prefix_and_no_timestamp(spool: Path) -> None:
    err = run_chute(spool, "run", str(EXAMPLES / "hello.yaml"), env={"JOURNAL_STREAM": "8:1234"})
    lines = err.splitlines()
    assert lines
    assert all(line.startswith("<6>") or line.startswith("<4>") for line in lines)
    assert not any(line[3:7].isdigit() and line[7] == "-" for line in lines)  # no date
    assert any("stage hello finished state=succeeded exit_code=0 attempt=1/1" in x for x in lines)


def test_on_a_terminal_or_file_lines_carry_time_and_level(spool: Path) -> None:
    err = run_chute(spool, "run", str(EXAMPLES / "hello.yaml"))
    first = err.splitlines()[0]
    date, clock, level = first.split()[:3]
    assert len(date) == 10
    assert date[4] == "-"
    assert clock.count(":") == 2
    assert level == "INFO"


def test_log_format_json_prints_one_object_per_line(spool: Path, tmp_path: Path) -> None:
    config = tmp_path / "chute.yaml"
    config.write_text("log_format: json\nhttp: {listen: '127.0.0.1:0'}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chute", "daemon", "--spool", str(spool), "--config", str(config)],
        env=chute_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    proc.terminate()
    rest = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0
    for text in [line, *rest.splitlines()]:
        doc = orjson.loads(text)
        assert set(doc) >= {"time", "level", "logger", "message"}
    assert orjson.loads(line)["message"].startswith("daemon started spool=")


def test_the_holding_thread_writes_its_info_lines_in_one_go_and_warnings_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.setup(logging.INFO)
    log = logging.getLogger("chute.test")
    try:
        logs.hold()
        log.info("first")
        log.info("second")
        other = threading.Thread(target=lambda: log.info("from another thread"))
        other.start()
        other.join()
        assert "from another thread" in out.getvalue()
        assert "first" not in out.getvalue()
        writes = []
        monkeypatch.setattr(out, "write", lambda s: writes.append(s) or len(s))
        logs.write_held()
        assert len(writes) == 1
        assert writes[0].index("first") < writes[0].index("second")
        log.info("third")
        assert len(writes) == 1
        log.warning("trouble")
        assert len(writes) == 2
        assert writes[1].index("third") < writes[1].index("trouble")
        log.info("fourth")
        logs.unhold()
        log.info("fifth")
        assert [w.strip().rsplit(" ", 1)[-1] for w in writes[2:]] == ["fourth", "fifth"]
    finally:
        logs.unhold()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
