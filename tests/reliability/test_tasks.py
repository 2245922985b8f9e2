"""Scenario 6: tasks that misbehave. Pass: no process outlives its task's end, the log is
capped with a note, the daemon stays responsive throughout.

Each task runs in the real daemon (a subprocess, default config but for `kill_grace`).
"No process outlives the task" is checked by the cookie every task's environment carries
(CHUTE_TASK_KEY=<run_id>/…, read from /proc/*/environ): none may be left once the run is
final, since the daemon records a task's end only after its processes are gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from chute.clock import parse_rfc3339
from chute.execution.logpipe import DEFAULT_LOG_LIMIT, cap_note
from conftest import chute_env, load_json, pid_alive, wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, healthz, job, runs_of

__all__ = ["daemon_factory"]


def task_processes(run_id: str) -> list[int]:
    """Pids of live processes whose environment carries a task cookie of `run_id`."""
    cookie = f"CHUTE_TASK_KEY={run_id}/".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or not ours to read
            continue
        if any(entry.startswith(cookie) for entry in env.split(b"\0")):
            found.append(int(name))
    return found


def stage_of(spool: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """The one stage of a Job's run, from its manifest."""
    stages: list[dict[str, Any]] = load_json(spool / "runs" / rec["run_id"] / "manifest.json")[
        "stages"
    ]
    assert len(stages) == 1, stages
    return stages[0]


def log_path(spool: Path, rec: dict[str, Any]) -> Path:
    return spool / "runs" / str(rec["run_id"]) / str(stage_of(spool, rec)["log"])


def run_job(spool: Path, name: str, command: str, extra: str = "") -> dict[str, Any]:
    drop(spool, f"{name}.yaml", job(name, command, extra))
    rec = final_run(spool, f"incoming/{name}.yaml", timeout=60)
    assert task_processes(rec["run_id"]) == [], f"processes of {name} outlived its run"
    return rec


def test_setsid_grandchild_does_not_outlive_a_task_that_exits_0(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    pidfile = tmp_path / "escapee.pid"
    script = (
        f"setsid sh -c 'echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; sleep 1000' & "
        f"while [ ! -e {pidfile} ]; do sleep 0.01; done; exit 0"
    )
    rec = run_job(spool, "escape", script)
    assert rec["state"] == "succeeded"
    escapee = int(pidfile.read_text())
    assert not pid_alive(escapee)
    assert d.stop() == 0


@pytest.mark.slow
def test_task_that_ignores_sigterm_is_killed_at_its_timeout(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    t0 = time.monotonic()
    rec = run_job(spool, "stubborn", "trap '' TERM; sleep 30", "  timeout: 1s\n")
    assert time.monotonic() - t0 < 15
    assert rec["state"] == "failed"
    stage = stage_of(spool, rec)
    assert stage["state"] == "timed_out"
    attempt = stage["attempts"][-1]
    assert (attempt["signal"], attempt["error"]) == (
        9,
        "timed out after 1s (SIGTERM, then SIGKILL after 1s)",
    )
    assert d.stop() == 0


STATUS_CLIENT = """
import contextlib, io, sys, time
from chute import cli
for spool in sys.stdin:
    t0 = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["status", "--spool", spool.strip()])
    print(code, time.monotonic() - t0, flush=True)
"""


class StatusClient:
    """`chute status` as users run it, less the interpreter's start.

    A fresh `python -m chute status` spends 0.6 to 0.9 s on this two-core machine starting
    Python and importing, busy daemon or not; that is the CLI's cost, not the daemon's
    answer, so one process imports the CLI once and runs `cli.main(["status", ...])` per
    request.
    """

    def __init__(self, spool: Path):
        self.spool = spool
        self.proc = subprocess.Popen(
            [sys.executable, "-c", STATUS_CLIENT],
            env=chute_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self) -> tuple[int, float]:
        """(exit code, seconds the status command took)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{self.spool}\n")
        self.proc.stdin.flush()
        code, took = self.proc.stdout.readline().split()
        return int(code), float(took)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@dataclass
class Sample:
    status_seconds: float  # how long `chute status` took to answer
    status_code: int
    status_age: float  # now minus status.json's updated_at
    run_running: bool
    task_processes: int


@pytest.mark.slow
def test_task_writing_a_gigabyte_gets_a_capped_log_and_the_daemon_stays_responsive(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    assert d.proc is not None
    daemon = psutil.Process(d.proc.pid)
    samples: list[Sample] = []
    stop = threading.Event()
    status = StatusClient(spool)

    def sample() -> None:
        # `chute status` reads state/status.json, which the daemon's loop rewrites every
        # second: a stale file or a slow answer means the loop is stuck.
        while not stop.is_set():
            recs = runs_of(spool, "incoming/flood.yaml")
            running = bool(recs) and recs[0]["state"] == "running"
            procs = len(task_processes(recs[0]["run_id"])) if running else 0
            code, took = status.ask()
            st = load_json(spool / "state" / "status.json")
            age = time.time() - parse_rfc3339(st["updated_at"]).timestamp()
            samples.append(Sample(took, code, age, running, procs))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample)
    cpu0 = daemon.cpu_times()
    sampler.start()
    try:
        # the sleep keeps the run going for a few samples after the writer is done
        rec = run_job(spool, "flood", "head -c 1G /dev/zero; sleep 1.5")
    finally:
        stop.set()
        sampler.join()
        status.close()
    cpu1 = daemon.cpu_times()
    assert rec["state"] == "succeeded"
    note = cap_note(DEFAULT_LOG_LIMIT)
    assert note == b"\n--- chute: log capped at 64MiB; the rest of the output was discarded ---\n"
    log = log_path(spool, rec)
    assert log.stat().st_size == DEFAULT_LOG_LIMIT + len(note)
    with open(log, "rb") as f:
        f.seek(DEFAULT_LOG_LIMIT - 1)
        assert f.read() == b"\0" + note
    during = [s for s in samples if s.run_running]
    assert during, f"no sample while the run was running: {samples}"
    assert any(s.task_processes for s in during)  # the cookie scan does see live tasks
    for s in samples:
        assert s.status_code == 0, s
        assert s.status_seconds < 1.0, s
        assert s.status_age < 2.5, s
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    worst = max(s.status_seconds for s in samples)
    print(
        f"daemon cpu {cpu:.2f}s for 1 GiB of output ({len(samples)} status samples, "
        f"slowest {worst:.2f}s, oldest status {max(s.status_age for s in samples):.2f}s)"
    )
    assert d.stop() == 0


def test_task_that_closes_stdout_early_and_writes_to_stderr_succeeds(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    script = "echo out; exec 1>&-; for i in 1 2 3; do echo err$i >&2; sleep 0.2; done"
    rec = run_job(spool, "closer", script)
    assert rec["state"] == "succeeded"
    assert log_path(spool, rec).read_text() == "out\nerr1\nerr2\nerr3\n"
    assert d.stop() == 0


def test_no_task_process_is_left_when_the_daemon_stops_mid_task(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\nstop_timeout: 1s\n").start()
    drop(spool, "busy.yaml", job("busy", "setsid sleep 1000 & sleep 1000"))

    def running() -> str | None:
        recs = runs_of(spool, "incoming/busy.yaml")
        if recs and recs[0]["state"] == "running" and task_processes(recs[0]["run_id"]):
            return str(recs[0]["run_id"])
        return None

    run_id = wait_for("the busy task to run", running, 30)
    assert d.stop() == 0
    assert task_processes(run_id) == []


# --- tasks that break their own run folder ---------------------------------------------
#
# A task's folder is hostile input: whatever a task puts in place of its output, its
# artifacts, its log, its inputs or its folders, its attempt ends failed with a reason that
# says what is there (or, where chute can simply replace what the task left, the attempt
# runs), and the daemon goes on: /healthz answers 200, the next job runs, a restart finds
# nothing it trips on. In the reasons, {stage} is the stage's (or shard 0's) folder.

PY = sys.executable
DEEP = "d" * 200  # a folder name; 25 of them nested make a path longer than PATH_MAX


def pipeline(*stages: str, extra: str = "") -> str:
    body = "".join(f"    - {stage}\n" for stage in stages)
    return (
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: hostile}\n"
        f"spec:\n{extra}  stages:\n{body}"
    )


def stage(run: str, extra: str = "", name: str = "bad") -> str:
    return f"{{name: {name}, run: {json.dumps(run)}{', ' if extra else ''}{extra}}}"


def call_stage(fn: str, mods: str, extra: str = "") -> str:
    return f"{{name: bad, call: 'hostile_mod:{fn}', workdir: {mods}{', ' if extra else ''}{extra}}}"


RETRY = "retries: {max: 1, delay: 100ms}"
LOG = 'L="$CHUTE_RUN_DIR/stages/$CHUTE_STAGE/log"; rm -rf "$L"; '
HOSTILE_MOD = """
import os, shutil

def artifacts_file(ctx):
    shutil.rmtree(ctx.artifacts)
    with open(ctx.artifacts, "w") as f:
        f.write("not a folder")
    return {"n": 1}

def artifact_fifo(ctx):
    os.mkfifo(os.path.join(ctx.artifacts, "results.pipe"))
    return {"n": 1}

def mark_folder(ctx):
    os.makedirs(os.path.join(os.path.dirname(ctx.artifacts), "output.json"), exist_ok=True)
    return {"n": 1}

def log_fifo(ctx):
    log = os.path.join(os.path.dirname(ctx.artifacts), "log")
    os.unlink(log)
    os.mkfifo(log)
    raise RuntimeError("left a FIFO as my log")
"""


@dataclass(frozen=True)
class Hostile:
    stages: tuple[str, ...]  # the pipeline's stages; the one named `bad` misbehaves
    state: str  # the run's final state
    reason: str | None  # the last attempt's error of `bad` ({stage}: its folder, shard 0's)
    sharded: bool = False
    slow: bool = False  # a variant of a row the default suite has: CI runs it


HOSTILE = {
    "output-is-a-folder": Hostile(
        (stage('mkdir -p "$CHUTE_OUTPUT"'),),
        "failed",
        "CHUTE_OUTPUT {stage}/.output.json is a directory, not a regular file; write the JSON "
        "output as a file at that path",
    ),
    "output-is-a-fifo": Hostile(
        (stage('rm -rf "$CHUTE_OUTPUT"; mkfifo "$CHUTE_OUTPUT"'),),
        "failed",
        "CHUTE_OUTPUT {stage}/.output.json is a FIFO, not a regular file; write the JSON "
        "output as a file at that path",
        slow=True,
    ),
    "output-is-a-link": Hostile(
        (stage('ln -sfn /etc/passwd "$CHUTE_OUTPUT"'),),
        "failed",
        "CHUTE_OUTPUT {stage}/.output.json is a symbolic link, not a regular file; write the "
        "JSON output as a file at that path",
        slow=True,
    ),
    "output-is-huge": Hostile(
        (stage('truncate -s 3G "$CHUTE_OUTPUT"'),),
        "failed",
        "output is 3221225472 bytes, over the 1 MiB limit; write the data to a file under "
        "$CHUTE_ARTIFACTS (ctx.artifacts) and return its path instead",
        slow=True,
    ),
    "artifacts-is-a-file": Hostile(
        (stage('rm -rf "$CHUTE_ARTIFACTS"; echo x > "$CHUTE_ARTIFACTS"'),),
        "failed",
        "$CHUTE_ARTIFACTS {stage}/artifacts is a regular file, not a folder; leave it a folder "
        "and write the artifacts into it",
    ),
    "artifacts-is-a-fifo": Hostile(
        (stage('rm -rf "$CHUTE_ARTIFACTS"; mkfifo "$CHUTE_ARTIFACTS"'),),
        "failed",
        "$CHUTE_ARTIFACTS {stage}/artifacts is a FIFO, not a folder; leave it a folder and "
        "write the artifacts into it",
        slow=True,
    ),
    "artifacts-is-a-link": Hostile(
        (stage('rm -rf "$CHUTE_ARTIFACTS"; ln -s /etc "$CHUTE_ARTIFACTS"'),),
        "failed",
        "$CHUTE_ARTIFACTS {stage}/artifacts is a symbolic link, not a folder; leave it a "
        "folder and write the artifacts into it",
        slow=True,
    ),
    # Root lists a chmod 000 folder all the same; what root meets is a path too long to open.
    "artifacts-deeper-than-path-max": Hostile(
        (
            stage(
                f'cd "$CHUTE_ARTIFACTS"; {PY} -c "import os; d = \'{DEEP}\'; '
                '[(os.mkdir(d), os.chdir(d)) for _ in range(25)]"'
            ),
        ),
        "failed",
        f"cannot list artifact folder '{DEEP[:60]}<any>{DEEP[-60:]}': File name too long",
    ),
    "artifact-is-a-fifo": Hostile(
        (stage('mkfifo "$CHUTE_ARTIFACTS/results.pipe"'),),
        "failed",
        "artifact 'results.pipe' is a FIFO, not a file or folder; artifacts are files: remove "
        "it (or put a regular file in its place) before the task ends",
    ),
    "artifact-is-a-socket": Hostile(
        (
            stage(
                f'mkdir "$CHUTE_ARTIFACTS/s"; cd "$CHUTE_ARTIFACTS"; '
                f"{PY} -c \"import socket; socket.socket(socket.AF_UNIX).bind('s/ock')\""
            ),
        ),
        "failed",
        "artifact 's/ock' is a socket, not a file or folder; artifacts are files: remove it (or "
        "put a regular file in its place) before the task ends",
        slow=True,
    ),
    "log-is-a-folder": Hostile(
        (stage(LOG + 'mkdir "$L"; exit 1', RETRY),),
        "failed",
        "log {stage}/log is a directory, not a regular file; remove it so the stage's output "
        "can be logged there",
        slow=True,
    ),
    "log-is-a-fifo": Hostile(
        (stage(LOG + 'mkfifo "$L"; exit 1', RETRY),),
        "failed",
        "log {stage}/log is a FIFO, not a regular file; remove it so the stage's output can be "
        "logged there",
    ),
    "log-is-a-link": Hostile(
        (stage(LOG + 'ln -s /etc/passwd "$L"; exit 1', RETRY),),
        "failed",
        "log {stage}/log is a symbolic link, not a regular file; remove it so the stage's "
        "output can be logged there",
        slow=True,
    ),
    "inputs-is-a-folder": Hostile(
        (
            stage("true", name="up"),
            stage(
                'rm -f "$CHUTE_INPUTS"; mkdir "$CHUTE_INPUTS"; exit 1', f"dependsOn: [up], {RETRY}"
            ),
        ),
        "failed",
        "cannot write CHUTE_INPUTS {stage}/.inputs.json: Is a directory",
    ),
    # A FIFO (or a link) where chute writes a file of its own is simply replaced.
    "inputs-is-a-fifo": Hostile(
        (
            stage("true", name="up"),
            stage(
                '[ -e ../once ] && exec cat "$CHUTE_INPUTS"; touch ../once; '
                'rm "$CHUTE_INPUTS"; mkfifo "$CHUTE_INPUTS"; exit 1',
                f"dependsOn: [up], {RETRY}",
            ),
        ),
        "succeeded",
        None,
    ),
    "done-mark-is-a-folder": Hostile(
        (stage("mkdir output.json"),),
        "failed",
        "cannot write the done-mark {stage}/output.json: Is a directory",
    ),
    "stage-folder-removed": Hostile(
        (stage('rm -rf "$CHUTE_RUN_DIR/stages/$CHUTE_STAGE"'),),
        "failed",
        "cannot write the done-mark {stage}/output.json: No such file or directory",
    ),
    # The first attempt fails on its CHUTE_OUTPUT; the retry on its folders, not the run.
    # One shard: with two, a sibling failing for good first would skip this one's retry.
    "shard-folder-made-a-fifo": Hostile(
        (stage('d="$PWD"; cd /; rm -rf "$d"; mkfifo "$d"', f"shards: 1, {RETRY}"),),
        "failed",
        "cannot make folder {stage}/artifacts: Not a directory",
        sharded=True,
    ),
    # Shard 1 makes shard 0's folder (which passed its own checks) a FIFO: the stage's
    # listing leaves shard 0 out, with a warning; nothing is left to fail.
    "sibling-shard-folder-made-a-fifo": Hostile(
        (
            stage(
                '[ "$CHUTE_SHARD_INDEX" = 0 ] && exit 0; '
                "while [ ! -e ../0/output.json ]; do sleep 0.02; done; "
                "rm -rf ../0; mkfifo ../0",
                "shards: 2",
            ),
        ),
        "succeeded",
        None,
        sharded=True,
        slow=True,
    ),
    "call-artifacts-is-a-file": Hostile(
        (call_stage("artifacts_file", "{mods}"),),
        "failed",
        "$CHUTE_ARTIFACTS {stage}/artifacts is a regular file, not a folder; leave it a folder "
        "and write the artifacts into it",
        slow=True,
    ),
    "call-artifact-is-a-fifo": Hostile(
        (call_stage("artifact_fifo", "{mods}"),),
        "failed",
        "artifact 'results.pipe' is a FIFO, not a file or folder; artifacts are files: remove "
        "it (or put a regular file in its place) before the task ends",
    ),
    "call-done-mark-is-a-folder": Hostile(
        (call_stage("mark_folder", "{mods}"),),
        "failed",
        "cannot write the done-mark {stage}/output.json: Is a directory",
        slow=True,
    ),
    "call-log-is-a-fifo": Hostile(
        (call_stage("log_fifo", "{mods}", RETRY),),
        "failed",
        "log {stage}/log is a FIFO, not a regular file; remove it so the stage's output can be "
        "logged there",
    ),
}


def matches(pattern: str, text: str) -> bool:
    """`text` is `pattern`, where `<any>` stands for any text."""
    regex = ".*".join(re.escape(part) for part in pattern.split("<any>"))
    return re.fullmatch(regex, text, re.DOTALL) is not None


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, id=name, marks=[pytest.mark.slow] if case.slow else [])
        for name, case in HOSTILE.items()
    ],
)
def test_a_task_that_breaks_its_own_folder_fails_its_attempt_and_the_daemon_goes_on(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon], case: Hostile
) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "hostile_mod.py").write_text(HOSTILE_MOD)
    d = daemon_factory("kill_grace: 1s\n").start()
    text = pipeline(*(s.replace("{mods}", str(mods)) for s in case.stages))
    drop(spool, "hostile.yaml", text)
    rec = final_run(spool, "incoming/hostile.yaml", timeout=60)
    run_dir = spool / "runs" / rec["run_id"]
    bad = {s["name"]: s for s in load_json(run_dir / "manifest.json")["stages"]}["bad"]
    assert rec["state"] == case.state, (rec, bad)
    attempts = bad["shards"][0]["attempts"] if case.sharded else bad["attempts"]
    if case.reason is None:
        assert bad["state"] == "succeeded", bad
    else:
        folder = run_dir / "stages" / "bad" / ("0" if case.sharded else "")
        reason = case.reason.format(stage=str(folder).rstrip("/"))
        assert matches(reason, attempts[-1]["error"]), (attempts[-1]["error"], reason)
    assert task_processes(rec["run_id"]) == []
    assert healthz(spool)[0] == 200, healthz(spool)
    drop(spool, "after.yaml", job("after", "echo fine"))
    assert final_run(spool, "incoming/after.yaml")["state"] == "succeeded"
    assert d.stop() == 0
    d.messages.clear()
    d.start()  # recovery reads the run folders as the tasks left them
    wait_for("/healthz to answer 200 after the restart", lambda: healthz(spool)[0] == 200, 30)
    assert load_json(run_dir / "run.json") == rec
    assert d.stop() == 0


def test_a_run_resumed_into_the_folder_its_task_broke_fails_and_the_daemon_stays_up(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    """kill -9 as the broken attempt's end is recorded: the restart resumes the run, the
    stage starts again on what its task left (a FIFO for a log, a folder for its output),
    and fails with the reason, where it used to take the daemon down at every start."""
    crash = {"CHUTE_CRASH_AT": "loop.attempt_recorded"}
    d = daemon_factory("kill_grace: 1s\n", env=crash).start()
    drop(spool, "hostile.yaml", pipeline(stage(LOG + 'mkfifo "$L"; mkdir -p "$CHUTE_OUTPUT"')))
    assert d.proc is not None
    assert d.proc.wait(timeout=60) == -signal.SIGKILL
    d.proc = None
    d.env = {}
    d.messages.clear()
    d.start()
    rec = final_run(spool, "incoming/hostile.yaml", timeout=60)
    assert (rec["state"], rec["recoveries"]) == ("failed", 1)
    folder = spool / "runs" / rec["run_id"] / "stages" / "bad"
    assert rec["error"] == (
        f"stage bad failed: log {folder}/log is a FIFO, not a regular file; remove it so the "
        "stage's output can be logged there"
    )
    assert healthz(spool)[0] == 200, healthz(spool)
    drop(spool, "after.yaml", job("after", "echo fine"))
    assert final_run(spool, "incoming/after.yaml")["state"] == "succeeded"
    assert d.stop() == 0


def test_a_cache_entry_a_task_broke_is_a_miss_and_the_stage_runs(
    spool: Path, tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    """A task reaches cache/ through its run folder's parents: an entry made a FIFO must not
    block the loop that reads it, a key folder made a file must not stop the one that writes
    it (what is there is removed and the entry made whole)."""
    counter = tmp_path / "count"
    cached = pipeline(stage(f"echo x >> {counter}", "cache: true", name="expensive"))
    d = daemon_factory("kill_grace: 1s\n").start()
    drop(spool, "c1.yaml", cached)
    assert final_run(spool, "incoming/c1.yaml")["state"] == "succeeded"
    [entry] = (spool / "cache").iterdir()
    breaker = 'c="$CHUTE_RUN_DIR/../../cache"; for e in "$c"/*; do rm -rf "$e"; mkdir "$e"; '
    breaker += 'mkfifo "$e/entry.json"; done'
    drop(spool, "break.yaml", job("breaker", breaker))
    assert final_run(spool, "incoming/break.yaml")["state"] == "succeeded"
    assert (entry / "entry.json").is_fifo()
    drop(spool, "c2.yaml", cached)
    rec = final_run(spool, "incoming/c2.yaml")
    assert rec["state"] == "succeeded"
    [stage_rec] = load_json(spool / "runs" / rec["run_id"] / "manifest.json")["stages"]
    assert stage_rec["cache"] == {"key": entry.name, "hit": False}
    assert counter.read_text() == "x\nx\n"
    # The entry was made again over the FIFO; now the key's folder is made a file.
    assert (entry / "entry.json").is_file()
    shutil.rmtree(entry)
    entry.write_text("not a folder")
    drop(spool, "c3.yaml", cached)
    assert final_run(spool, "incoming/c3.yaml")["state"] == "succeeded"
    assert counter.read_text() == "x\nx\nx\n"
    assert (entry / "entry.json").is_file()  # made again, before its run ended
    drop(spool, "c4.yaml", cached)
    assert final_run(spool, "incoming/c4.yaml")["state"] == "succeeded"
    assert counter.read_text() == "x\nx\nx\n"  # a hit
    assert healthz(spool)[0] == 200, healthz(spool)
    log = d.log.read_text()
    assert f"cache entry {entry.name} is unreadable (is a FIFO, not a regular file)" in log
    assert f"cache entry {entry.name} is unreadable (Not a directory)" in log
    assert d.stop() == 0
