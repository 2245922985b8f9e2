"""Task cgroups with real groups and processes: made, joined before exec, killed, removed.

Skipped where this process cannot make a cgroup v2 group (no cgroup2 mount, no write
access); the daemon then falls back to process groups (tests/reliability/test_leftovers.py
runs it both ways).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chute.execution import cgroups, runner
from chute.execution.executor import Task
from chute.execution.owners import Owner, Record
from conftest import chute_env, pid_alive, wait_for
from fixtures_procs import PolledExecutor

PATH = "/usr/local/bin:/usr/bin:/bin"
RUN_ID = "20261201_120000_abcdef"


def writable_base() -> str | None:
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


pytestmark = pytest.mark.skipif(writable_base() is not None, reason=str(writable_base()))
MOUNT = hier.mount if (hier := cgroups.hierarchy()) is not None else Path("/nonexistent")


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    root = tmp_path / "spool"
    (root / "state").mkdir(parents=True)
    return root


@pytest.fixture
def owner(spool: Path, tmp_path: Path) -> Iterator[Owner]:
    record = Record.create(tmp_path / "record")
    group = cgroups.setup(
        spool, f"{cgroups.FOREGROUND_PREFIX}{RUN_ID}", leaf=False, note=record.cgroup
    )
    assert isinstance(group, cgroups.OwnerGroup), group
    yield Owner(record, group, None)
    record.close()


@pytest.fixture
def executor(owner: Owner) -> Iterator[PolledExecutor]:
    ex = PolledExecutor(kill_grace=0.5, max_workers=1, owner=owner)
    yield ex
    ex.close()


def run_task(tmp: Path, key: str, command: str | tuple[str, ...], **kw: object) -> Task:
    return Task(
        key=key,
        kind="run",
        cores=(),
        log_path=str(tmp / "logs" / f"{key.replace('/', '_')}.log"),
        output_path=str(tmp / f"{key.replace('/', '_')}.output.json"),
        env={"PATH": PATH},
        command=command,
        **kw,  # type: ignore[arg-type]
    )


def results(ex: PolledExecutor, *keys: str, timeout: float = 20.0) -> dict[str, runner.Result]:
    got: dict[str, runner.Result] = {}
    deadline = time.monotonic() + timeout
    while set(keys) - set(got):
        if time.monotonic() > deadline:
            pytest.fail(f"no results for {sorted(set(keys) - set(got))} within {timeout}s")
        got.update((r.key, r) for r in ex.poll(0.2))
    return got


def one(ex: PolledExecutor, key: str) -> runner.Result:
    return results(ex, key)[key]


def test_groups_are_named_by_spool_and_owner_and_go_with_the_owner(
    spool: Path, tmp_path: Path, owner: Owner
) -> None:
    assert owner.cgroup is not None
    path = owner.cgroup.path
    base = cgroups.base(leaf=False)
    assert base is not None
    assert path == base / cgroups.spool_group(spool) / f"foreground-{RUN_ID}"
    assert (path / "pool").is_dir()
    assert (tmp_path / "record").read_text() == f"cgroup {path}\n"  # recorded before made
    other = tmp_path / "other"
    other.mkdir()
    assert cgroups.spool_group(other) != cgroups.spool_group(spool)
    assert cgroups.spool_group(spool) == cgroups.spool_group(tmp_path / "." / "spool")
    owner.cgroup.close()
    assert not path.exists()
    assert not path.parent.exists()  # the spool's group goes with its last owner


def test_a_run_task_and_what_it_forks_at_once_are_in_its_group_which_goes_with_its_result(
    executor: PolledExecutor, owner: Owner, tmp_path: Path
) -> None:
    assert owner.cgroup is not None
    key = f"{RUN_ID}/stage"
    group = owner.cgroup.path / cgroups.group_name(key)
    executor.start(run_task(tmp_path, key, "cat /proc/self/cgroup; (cat /proc/self/cgroup) & wait"))
    result = one(executor, key)
    assert result.ok, result
    assert not group.exists()
    lines = Path(tmp_path / "logs" / f"{RUN_ID}_stage.log").read_text().splitlines()
    mine = [line for line in lines if line.startswith("0::")]
    assert len(mine) == 2
    assert {MOUNT / line[4:] for line in mine} == {group}


def test_an_argv_task_joins_its_group_with_its_environment_unchanged(
    executor: PolledExecutor, owner: Owner, tmp_path: Path
) -> None:
    assert owner.cgroup is not None
    executor.start(run_task(tmp_path, "argv", ("cat", "/proc/self/cgroup")))
    executor.start(run_task(tmp_path, "env", ("env",)))
    assert all(r.ok for r in results(executor, "argv", "env").values())
    text = (tmp_path / "logs" / "argv.log").read_text()
    assert f"0::/{owner.cgroup.path.relative_to(MOUNT)}/t-argv\n" in text
    env = (tmp_path / "logs" / "env.log").read_text().split()
    assert sorted(e.split("=", 1)[0] for e in env) == ["CHUTE_TASK_KEY", "PATH"]


def test_a_missing_argv_program_is_named_as_without_a_group(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    executor.start(run_task(tmp_path, "t", ("no-such-tool", "x")))
    r = one(executor, "t")
    assert r.error == f"cannot start no-such-tool: No such file or directory (PATH={PATH})"


def test_a_process_left_in_the_tasks_group_is_killed_before_its_result(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    # Not a process of the task's tree (the sweep cannot see it), but in the task's group:
    # the group decides, so the Result comes once it is dead.
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        own_group = f'"$(sed -n "s|^0::|{MOUNT}|p" /proc/self/cgroup)"'
        task = run_task(tmp_path, "mover", f"echo {stranger.pid} > {own_group}/cgroup.procs")
        executor.start(task)
        result = one(executor, "mover")
        assert result.ok, result
        assert stranger.wait(timeout=5) == -signal.SIGKILL
    finally:
        stranger.kill()
        stranger.wait()


def test_a_task_that_cannot_join_its_group_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    task = run_task(tmp_path, "t", f"touch {marker}")
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        proc = runner.spawn(task, stdin=devnull, mono=0.0, grace=1.0, cgroup=tmp_path / "gone")
        proc.popen.wait(timeout=10)
        assert proc.reap(0.0)
        proc.log.drain()
        os.close(proc.pidfd)
    finally:
        os.close(devnull)
    result = proc.result(False)
    assert result.exit_code == cgroups.JOIN_FAILED
    assert result.error == (
        f"could not join its cgroup {tmp_path / 'gone'}, so it did not run (see its log)"
    )
    assert not marker.exists()
    assert cgroups.JOIN_NOTE in (tmp_path / "logs" / "t.log").read_text()


def test_a_call_worker_that_cannot_join_its_group_runs_no_call(spool: Path, tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text("def f(path):\n    open(path, 'w').close()\n")
    marker = tmp_path / "ran"
    record = Record.create(tmp_path / "record")
    missing = cgroups.OwnerGroup(tmp_path / "no-such-group")
    ex = PolledExecutor(kill_grace=0.5, max_workers=1, owner=Owner(record, missing, None))
    try:
        ex.start(
            Task(
                key="c",
                kind="call",
                cores=(),
                log_path=str(tmp_path / "logs" / "c.log"),
                output_path=str(tmp_path / "c.json"),
                env={},
                cwd=str(tmp_path),
                call="mod:f",
                kwargs={"path": str(marker)},
            )
        )
        ex.start(run_task(tmp_path, "r", "true"))
        got = results(ex, "c", "r")
        call, run = got["c"], got["r"]
    finally:
        ex.close()
        record.close()
    assert call.error == (
        f"the worker could not join its cgroup {missing.pool} (No such file or directory), "
        "so the call did not run"
    )
    assert run.error == f"cannot make its cgroup {missing.path / 't-r'}: No such file or directory"
    assert not marker.exists()


def test_killing_a_group_ends_members_that_left_their_process_group_and_environment(
    owner: Owner, tmp_path: Path
) -> None:
    assert owner.cgroup is not None
    group = owner.cgroup.task("escape")
    pidfile = tmp_path / "pid"
    starter = subprocess.Popen(
        cgroups.join_argv(
            group,
            f"setsid env -i /bin/sh -c 'echo $$ > {pidfile}; exec sleep 300' "
            ">/dev/null 2>&1 </dev/null &",
        )
    )
    assert starter.wait(timeout=10) == 0
    wait_for("the escapee", lambda: pidfile.exists() and pidfile.read_text().strip())
    escapee = int(pidfile.read_text())
    assert cgroups.members(owner.cgroup.path) == [escapee]
    assert cgroups.signal_members(owner.cgroup.path, 0) == 1  # reachable through its pidfd
    cgroups.kill(owner.cgroup.path)
    assert cgroups.wait_empty([owner.cgroup.path], time.monotonic() + 5)
    wait_for("the escapee to be reaped by init", lambda: not pid_alive(escapee))
    owner.cgroup.close()
    assert not owner.cgroup.path.exists()


def test_a_daemon_outside_the_root_group_moves_itself_into_a_leaf_first(
    spool: Path, tmp_path: Path
) -> None:
    base = cgroups.base(leaf=False)
    assert base is not None
    service = base / f"service-{os.getpid()}"  # stands for systemd's chute.service
    service.mkdir()
    code = (
        "import sys; from pathlib import Path; from chute.execution import cgroups, procfs\n"
        "group = cgroups.setup(Path(sys.argv[1]), 'daemon', leaf=True, note=print)\n"
        "print(procfs.cgroup_of())\n"
        "group.close()\n"
    )
    try:
        done = subprocess.run(
            cgroups.join_argv(service, (sys.executable, "-c", code, str(spool))),
            env=chute_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            str(service / cgroups.spool_group(spool) / "daemon"),  # noted before it is made
            f"/{(service / 'daemon').relative_to(MOUNT)}",  # the daemon's own leaf
        ]
        assert [p.name for p in service.iterdir() if p.is_dir()] == ["daemon"]
    finally:
        cgroups.remove_tree(service)
