"""Scenario 7: an owner of tasks (the daemon, or `chute run`) is killed with -9. Pass:
everything it started (run: tasks and all they forked, even what left the process group
and cleared its environment; call: workers and what they started) is ended at the next
daemon start or `chute gc`, before anything runs again; nothing of a live owner is touched;
a foreground run whose owner is gone ends `interrupted`.

Each test runs twice: with cgroups (where this process can make cgroup v2 groups) and with
no cgroup v2 mounted (the daemon and `chute run` started in a mount namespace without it),
where chute falls back to process groups, the subreaper and the task cookie.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from chute.execution import cgroups
from conftest import Chute, chute_env, load_json, pid_alive, wait_for
from daemon_proc import Daemon, assert_settled, daemon_factory, drop, final_run, job, runs_of

__all__ = ["daemon_factory"]

CONFIG = "kill_grace: 1s\nstop_timeout: 1s\n"


def cgroups_writable() -> str | None:
    """Why this process cannot make chute's groups, or None when it can."""
    base = cgroups.base(leaf=False)
    if base is None:
        return "no cgroup v2 hierarchy"
    probe = base / f"chute-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot make a cgroup under {base}: {exc.strerror}"
    probe.rmdir()
    return None


@pytest.fixture(params=["cgroups", "no cgroups"])
def fence(request: pytest.FixtureRequest) -> list[str]:
    """The command prefix that runs chute with cgroups, or where none is mounted."""
    if request.param == "cgroups":
        reason = cgroups_writable()
        if reason is not None:
            pytest.skip(reason)
        return []
    hier = cgroups.hierarchy()
    if os.geteuid() != 0 or shutil.which("unshare") is None or hier is None:
        pytest.skip("hiding the cgroup2 mount needs root, unshare and a cgroup2 mount")
    return [
        *("unshare", "--mount", "--propagation", "private"),
        *("/bin/sh", "-c", 'umount -l "$0" && exec "$@"', str(hier.mount)),
    ]


def assert_fence(d: Daemon, fence: list[str]) -> None:
    """The daemon's start line says which fence it has."""
    text = d.log.read_text()
    if fence:
        assert "cgroups unavailable: no cgroup v2 hierarchy is mounted" in text, text
    else:
        assert "tasks run in cgroups under" in text, text


def start_chute_run(
    spool: Path, spec: Path, fence: list[str], *options: str
) -> subprocess.Popen[str]:
    cmd = [*fence, sys.executable, "-m", "chute", "run", str(spec), "--spool", str(spool)]
    cmd += options
    return subprocess.Popen(
        cmd, env=chute_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_pid(path: Path) -> int:
    wait_for(f"a pid in {path.name}", lambda: path.exists() and path.read_text().endswith("\n"), 30)
    return int(path.read_text().split()[0])


LEDGER = """\
import os
import subprocess
import time


def slow(ledger, pids, seconds):
    with open(ledger, "a") as f:
        f.write(f"start {os.getpid()}\\n")
    child = subprocess.Popen(["sleep", "300"])  # inherits the call's environment
    with open(pids, "a") as f:
        f.write(f"{os.getpid()} {child.pid}\\n")
    time.sleep(seconds)
    with open(ledger, "a") as f:
        f.write(f"end {os.getpid()}\\n")
    child.kill()
    child.wait()
"""


def ledger_call(tmp_path: Path, seconds: float) -> tuple[str, Path, Path]:
    """A Job whose call appends to a ledger, starts a `sleep 300` and sleeps `seconds`:
    (its spec, the ledger, the file of the worker's and the child's pids)."""
    calls = tmp_path / "calls"
    calls.mkdir()
    (calls / "ledgermod.py").write_text(LEDGER)
    ledger, pids = tmp_path / "ledger", tmp_path / "pids"
    spec = (
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: ledger}\nspec:\n"
        f"  workdir: {calls}\n  call: ledgermod:slow\n"
        f"  with: {{ledger: {ledger}, pids: {pids}, seconds: {seconds}}}\n"
    )
    return spec, ledger, pids


@pytest.mark.slow
def test_a_call_stage_has_its_side_effect_once_per_attempt_across_a_kill_9(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path, fence: list[str]
) -> None:
    spec, ledger, pids = ledger_call(tmp_path, seconds=5)
    d = daemon_factory(CONFIG, prefix=fence).start()
    drop(spool, "ledger.yaml", spec)
    wait_for("the call to start", lambda: pids.exists() and pids.read_text().endswith("\n"), 30)
    worker, child = map(int, pids.read_text().split())
    d.stop(signal.SIGKILL)
    d2 = daemon_factory(CONFIG, prefix=fence).start()
    assert_fence(d2, fence)
    assert not pid_alive(worker), "the crashed daemon's worker still runs its call"
    assert not pid_alive(child), "what the crashed call started still runs"
    rec = final_run(spool, "incoming/ledger.yaml", timeout=60)
    assert rec["state"] == "succeeded", rec
    assert rec["recoveries"] == 1
    lines = ledger.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["start", "start", "end"], lines
    assert lines[2] == lines[1].replace("start", "end")  # the attempt after the restart
    assert d2.stop() == 0


@pytest.mark.slow
def test_a_call_worker_dies_with_its_daemon_not_at_the_next_start(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A call's worker must not finish its call after a kill -9 of the daemon, whenever the
    next start comes: the forkserver ends with the daemon and the worker with the forkserver
    (a worker that kept the forkserver's liveness pipe open kept both alive)."""
    spec, ledger, pids = ledger_call(tmp_path, seconds=60)
    d = daemon_factory(CONFIG).start()
    drop(spool, "ledger.yaml", spec)
    wait_for("the call to start", lambda: pids.exists() and pids.read_text().endswith("\n"), 30)
    worker, child = map(int, pids.read_text().split())
    d.stop(signal.SIGKILL)
    wait_for("the worker to die with its daemon", lambda: not pid_alive(worker), 20)
    assert [line.split()[0] for line in ledger.read_text().splitlines()] == ["start"]
    d2 = daemon_factory(CONFIG).start()  # what the call started is the next start's to end
    assert not pid_alive(child)
    assert d2.stop() == 0  # the call resumed runs 60 s: stopped (stop_timeout 1s), not awaited


def test_a_daemon_start_leaves_a_live_chute_run_alone(
    spool: Path,
    daemon_factory: Callable[..., Daemon],
    tmp_path: Path,
    write_spec: Callable[[str, str], Path],
    fence: list[str],
) -> None:
    pidfile, gate = tmp_path / "pid", tmp_path / "gate"
    spec = write_spec(
        "fg.yaml", job("fg", f"echo $$ > {pidfile}; while ! test -e {gate}; do sleep 0.05; done")
    )
    run = start_chute_run(spool, spec, fence)
    try:
        task = read_pid(pidfile)
        d = daemon_factory(CONFIG, prefix=fence).start()
        assert_fence(d, fence)
        assert pid_alive(task), d.log.read_text()
        run_id = runs_of(spool)[0]["run_id"]
        if not fence:  # each owner has a group of its own
            base = cgroups.base(leaf=False)
            assert base is not None
            groups = base / cgroups.spool_group(spool)
            assert (groups / f"foreground-{run_id}").is_dir()
            assert (groups / "daemon").is_dir()
        gate.touch()
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, out + err
    assert load_json(spool / "runs" / run_id / "run.json")["state"] == "succeeded"
    assert "left by a previous daemon" not in d.log.read_text()
    assert d.stop() == 0


@pytest.mark.parametrize("sweeper", ["daemon start", "chute gc"])
@pytest.mark.slow
def test_a_chute_run_killed_9_has_its_tasks_ended_and_its_run_interrupted(
    spool: Path,
    daemon_factory: Callable[..., Daemon],
    chute: Chute,
    tmp_path: Path,
    write_spec: Callable[[str, str], Path],
    fence: list[str],
    sweeper: str,
) -> None:
    pidfile, childfile = tmp_path / "pid", tmp_path / "child"
    spec = write_spec(
        "fg.yaml",
        job("fg", f"setsid sleep 301 & echo $! > {childfile}; echo $$ > {pidfile}; sleep 300"),
    )
    run = start_chute_run(spool, spec, fence)
    try:
        task, escapee = read_pid(pidfile), read_pid(childfile)
        wait_for("the run to be running", lambda: runs_of(spool)[0]["state"] == "running", 30)
    finally:
        run.kill()
        run.communicate()
    run_id = runs_of(spool)[0]["run_id"]
    assert pid_alive(task)  # orphans now: nothing else ends them
    assert pid_alive(escapee)
    if sweeper == "daemon start":
        d = daemon_factory(CONFIG, prefix=fence).start()
        assert_fence(d, fence)
        said = d.log.read_text()
    else:
        done = chute("gc", prefix=fence)
        assert done.code == 0, done.err
        assert f"{run_id} interrupted: the `chute run` that ran it is gone\n" in done.out
        said = done.err
    assert not pid_alive(task)
    assert not pid_alive(escapee)
    assert (
        f"{run_id} interrupted: the `chute run` (pid {run.pid}) that ran it is gone; killed" in said
    )
    rec = load_json(spool / "runs" / run_id / "run.json")
    assert rec["state"] == "interrupted"
    assert rec["error"] == (
        f"the `chute run` process (pid {run.pid}) that ran it ended before the run did; a "
        f"foreground run is not resumed (`chute retry {run_id}` makes a new run from it)"
    )
    assert rec["finished_at"] is not None
    assert_settled(spool / "runs" / run_id)  # its manifest leaves nothing running
    assert not (spool / "state" / "foreground" / run_id).exists()
    assert not (spool / "queue" / f"{run_id}.yaml").exists()  # nothing resumes it
    if sweeper == "daemon start":
        assert d.stop() == 0
        assert load_json(spool / "runs" / run_id / "run.json")["state"] == "interrupted"


@pytest.mark.parametrize("point", ["owners.ended", "owners.interrupted"])
@pytest.mark.slow
def test_a_chute_gc_killed_while_it_ends_a_dead_chute_run_leaves_the_rest_to_the_next(
    spool: Path,
    chute: Chute,
    tmp_path: Path,
    write_spec: Callable[[str, str], Path],
    point: str,
) -> None:
    pidfile = tmp_path / "pid"
    spec = write_spec("fg.yaml", job("fg", f"echo $$ > {pidfile}; sleep 300"))
    run = start_chute_run(spool, spec, [])
    try:
        task = read_pid(pidfile)
        wait_for("the run to be running", lambda: runs_of(spool)[0]["state"] == "running", 30)
    finally:
        run.kill()
        run.communicate()
    run_id = runs_of(spool)[0]["run_id"]
    crashed = chute("gc", env={"CHUTE_CRASH_AT": point})
    assert crashed.code == -signal.SIGKILL, crashed.err
    assert not pid_alive(task)
    assert (spool / "state" / "foreground" / run_id).exists()
    marked = point == "owners.interrupted"
    assert (load_json(spool / "runs" / run_id / "run.json")["state"] == "interrupted") == marked
    done = chute("gc")
    assert done.code == 0, done.err
    said = f"{run_id} interrupted: the `chute run` that ran it is gone\n"
    assert (said in done.out) == (not marked)
    rec = load_json(spool / "runs" / run_id / "run.json")
    assert rec["state"] == "interrupted"
    assert f"(pid {run.pid})" in rec["error"]
    assert not (spool / "state" / "foreground" / run_id).exists()


@pytest.mark.slow
def test_a_running_daemon_ends_a_chute_run_killed_9_beside_it(
    spool: Path,
    daemon_factory: Callable[..., Daemon],
    tmp_path: Path,
    write_spec: Callable[[str, str], Path],
) -> None:
    pidfile = tmp_path / "pid"
    spec = write_spec("fg.yaml", job("fg", f"echo $$ > {pidfile}; sleep 300"))
    # A foreground run beside a daemon: `--here`, on the core the daemon does not use.
    d = daemon_factory(CONFIG + "cpus: '0'\n").start()
    wait_for("the daemon's status", (spool / "state" / "status.json").exists)
    run = start_chute_run(spool, spec, [], "--here")
    try:
        task = read_pid(pidfile)
    finally:
        run.kill()
        run.communicate()
    run_id = runs_of(spool)[0]["run_id"]

    def interrupted() -> bool:
        return load_json(spool / "runs" / run_id / "run.json")["state"] == "interrupted"

    wait_for("the daemon's retention pass to interrupt the run", interrupted, timeout=90)
    assert not pid_alive(task)
    assert d.stop() == 0


def test_a_task_child_that_left_its_group_and_cleared_its_environment_dies_at_restart(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    reason = cgroups_writable()
    if reason is not None:
        pytest.skip(f"only a cgroup can find such a child after a crash: {reason}")
    pidfile, gate = tmp_path / "pid", tmp_path / "gate"
    command = (
        f"test -e {gate} && exit 0; setsid env -i /bin/sh -c 'echo $$ > {pidfile}; "
        "exec sleep 171' >/dev/null 2>&1 & sleep 100"
    )
    d = daemon_factory(CONFIG).start()
    drop(spool, "escape.yaml", job("escape", command))
    escapee = read_pid(pidfile)
    d.stop(signal.SIGKILL)
    assert pid_alive(escapee)
    gate.touch()
    d2 = daemon_factory(CONFIG).start()
    assert not pid_alive(escapee)
    assert final_run(spool, "incoming/escape.yaml")["state"] == "succeeded"
    assert d2.stop() == 0


def test_daemons_on_two_spools_keep_to_their_own_cgroups(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    reason = cgroups_writable()
    if reason is not None:
        pytest.skip(reason)
    base = cgroups.base(leaf=False)
    assert base is not None
    other, other_tmp, gate = tmp_path / "spool2", tmp_path / "d2", tmp_path / "gate"
    other_tmp.mkdir()
    made: list[Daemon] = []
    try:
        a = daemon_factory(CONFIG).start()
        b = Daemon(other, other_tmp, CONFIG).start()
        made.append(b)
        pids = {}
        for name, root in (("a", spool), ("b", other)):
            pids[name] = tmp_path / f"{name}.pid"
            drop(
                root,
                f"{name}.yaml",
                job(name, f"echo $$ > {pids[name]}; until test -e {gate}; do sleep 0.05; done"),
            )
        task_a, task_b = read_pid(pids["a"]), read_pid(pids["b"])
        group_a = base / cgroups.spool_group(spool) / "daemon"
        group_b = base / cgroups.spool_group(other) / "daemon"
        assert group_a != group_b
        assert task_a in cgroups.members(group_a)
        assert task_b in cgroups.members(group_b)
        b.stop(signal.SIGKILL)
        b2 = Daemon(other, other_tmp, CONFIG).start()
        made.append(b2)
        assert not pid_alive(task_b)
        assert pid_alive(task_a)
        assert task_a in cgroups.members(group_a)
        gate.touch()
        assert final_run(spool, "incoming/a.yaml")["state"] == "succeeded"
        assert final_run(other, "incoming/b.yaml")["state"] == "succeeded"
        assert a.stop() == 0
        assert b2.stop() == 0
    finally:
        for d in made:
            d.close()
