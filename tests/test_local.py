"""The local executor with real processes: run: tasks, the orphan fence, call: workers."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

import fixtures_procs
from chute.execution.executor import MAX_OUTPUT_BYTES, Context, Mark, Result, Task
from chute.store import outputs
from conftest import tmpfs
from fixtures_procs import ManualClock, PolledExecutor, wait_for

# the fixtures this module uses (the lead may register fixtures_procs in conftest instead)
no_leaked_processes = fixtures_procs.no_leaked_processes
no_leaked_fds = fixtures_procs.no_leaked_fds
manual_clock = fixtures_procs.manual_clock
make_executor = fixtures_procs.make_executor
executor = fixtures_procs.executor

pytestmark = pytest.mark.usefixtures("no_leaked_fds")

PATH = "/usr/local/bin:/usr/bin:/bin"


def run_task(tmp: Path, key: str, command: str | tuple[str, ...], **kw: Any) -> Task:
    kw.setdefault("env", {"PATH": PATH})
    return Task(
        key=key,
        kind="run",
        cores=kw.pop("cores", ()),
        log_path=str(tmp / "logs" / f"{key}.log"),
        output_path=str(tmp / f"{key}.output.json"),
        command=command,
        **kw,
    )


def call_task(tmp: Path, key: str, call: str, **kw: Any) -> Task:
    kw.setdefault("env", {"PATH": PATH})
    kw.setdefault("cwd", str(tmp))
    return Task(
        key=key,
        kind="call",
        cores=kw.pop("cores", ()),
        log_path=str(tmp / "logs" / f"{key}.log"),
        output_path=str(tmp / f"{key}.output.json"),
        call=call,
        **kw,
    )


def results(ex: PolledExecutor, *keys: str, timeout: float = 20.0) -> dict[str, Result]:
    """Poll until every key has its Result."""
    got: dict[str, Result] = {}
    deadline = time.monotonic() + timeout
    while set(keys) - set(got):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout}s for results of {sorted(set(keys) - set(got))}")
        for r in ex.poll(0.2):
            assert r.key not in got, f"two results for {r.key}"
            got[r.key] = r
    return got


def one(ex: PolledExecutor, key: str, timeout: float = 20.0) -> Result:
    return results(ex, key, timeout=timeout)[key]


def log_of(tmp: Path, key: str) -> str:
    return (tmp / "logs" / f"{key}.log").read_text()


def wait_log(ex: PolledExecutor, tmp: Path, key: str, text: str) -> None:
    """Poll the executor (which copies a run: task's output into its log) until the log of
    `key` holds `text`; no task may end meanwhile."""

    def seen() -> bool:
        assert ex.poll(0.02) == [], f"a task ended while waiting for {text!r} in {key}'s log"
        path = tmp / "logs" / f"{key}.log"
        return path.exists() and text in path.read_text()

    wait_for(f"{text!r} in the log of {key}", seen)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_pid(path: Path) -> int:
    wait_for(f"a pid in {path}", lambda: path.exists() and path.read_text().strip() != "")
    return int(path.read_text())


def write_module(tmp: Path, name: str, source: str) -> None:
    path = tmp / Path(*name.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(tmp).parents:
        if parent != Path("."):
            (tmp / parent / "__init__.py").touch()
    path.write_text(textwrap.dedent(source))


# --- run: tasks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "exit_code", "sig", "error"),
    [
        ("true", 0, None, None),
        ("exit 3", 3, None, "exited with code 3"),
        ("kill -9 $$", None, 9, "killed by signal 9 (SIGKILL)"),
    ],
    ids=["success", "exit-code", "signal"],
)
def test_run_task_reports_how_its_process_ended(
    executor: PolledExecutor,
    tmp_path: Path,
    command: str,
    exit_code: int | None,
    sig: int | None,
    error: str | None,
) -> None:
    executor.start(run_task(tmp_path, "t", command))
    r = one(executor, "t")
    assert (r.exit_code, r.signal, r.error) == (exit_code, sig, error)
    assert r.ok == (exit_code == 0)


def test_environment_is_exactly_the_task_env_and_its_cookie(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    env = {"PATH": PATH, "HOME": "/nowhere", "CHUTE_RUN_ID": "r1"}
    executor.start(run_task(tmp_path, "t", ("env",), env=env))
    assert one(executor, "t").ok
    seen = dict(line.split("=", 1) for line in log_of(tmp_path, "t").splitlines())
    assert seen == {**env, "CHUTE_TASK_KEY": "t"}


def test_argv_command_is_looked_up_on_the_task_path(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "mytool"
    tool.write_text('#!/bin/sh\necho tool ran with "$1"\n')
    tool.chmod(0o755)
    executor.start(run_task(tmp_path, "t", ("mytool", "a b"), env={"PATH": f"{bindir}:{PATH}"}))
    assert one(executor, "t").ok
    assert log_of(tmp_path, "t") == "tool ran with a b\n"


def test_missing_program_is_a_failed_result(executor: PolledExecutor, tmp_path: Path) -> None:
    executor.start(run_task(tmp_path, "t", ("no-such-tool",), env={"PATH": "/bin"}))
    r = one(executor, "t")
    assert r.error == "cannot start no-such-tool: No such file or directory (PATH=/bin)"
    assert not r.ok


def test_missing_cwd_is_a_failed_result(executor: PolledExecutor, tmp_path: Path) -> None:
    executor.start(run_task(tmp_path, "t", "true", cwd=str(tmp_path / "gone")))
    assert one(executor, "t").error == (
        f"cannot change to cwd {tmp_path / 'gone'}: No such file or directory"
    )


def test_task_runs_in_its_cwd_with_stdin_empty(executor: PolledExecutor, tmp_path: Path) -> None:
    executor.start(run_task(tmp_path, "t", "pwd; cat; echo end", cwd=str(tmp_path)))
    assert one(executor, "t").ok
    assert log_of(tmp_path, "t") == f"{tmp_path}\nend\n"


def test_a_task_gets_only_its_three_descriptors_and_default_signals(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    # Nothing of the daemon's leaks into a task: no descriptor (those it inherited from
    # whoever started it included), and not what Python ignores (SIGPIPE, SIGXFSZ).
    executor.start(run_task(tmp_path, "t", "ls /proc/$$/fd; grep SigIgn /proc/$$/status"))
    assert one(executor, "t").ok
    fds, ignored = log_of(tmp_path, "t").rsplit("\n", 2)[:2]
    assert fds.split() == ["0", "1", "2"]
    assert ignored.split() == ["SigIgn:", "0000000000000000"]


def test_stdout_and_stderr_are_appended_to_the_log(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "t.log"
    log.parent.mkdir()
    log.write_text("earlier attempt\n")
    executor.start(run_task(tmp_path, "t", "echo out; echo err >&2"))
    assert one(executor, "t").ok
    assert log.read_text() == "earlier attempt\nout\nerr\n"


def test_output_file_is_read_checked_and_removed(executor: PolledExecutor, tmp_path: Path) -> None:
    out = tmp_path / "t.output.json"
    executor.start(run_task(tmp_path, "t", f"echo '{{\"rows\": 17}}' > {out}"))
    r = one(executor, "t")
    assert r.ok
    assert r.output is not None
    assert orjson.loads(r.output) == {"rows": 17}
    assert not out.exists()


def test_invalid_json_output_fails_a_task_that_exited_0(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    out = tmp_path / "t.output.json"
    executor.start(run_task(tmp_path, "t", f"echo 'rows: 17' > {out}"))
    r = one(executor, "t")
    assert r.exit_code == 0
    assert not r.ok
    assert r.error is not None
    assert r.error.startswith("CHUTE_OUTPUT is not valid JSON: unexpected character")
    assert r.output is None


def test_output_over_the_limit_fails_the_task(executor: PolledExecutor, tmp_path: Path) -> None:
    out = tmp_path / "t.output.json"
    size = MAX_OUTPUT_BYTES + 10
    executor.start(run_task(tmp_path, "t", f"head -c {size} /dev/zero > {out}"))
    r = one(executor, "t")
    assert (r.exit_code, r.ok) == (0, False)
    assert r.error == (
        f"output is {size} bytes, over the 1 MiB limit; write the data to a file under "
        "$CHUTE_ARTIFACTS (ctx.artifacts) and return its path instead"
    )
    assert not out.exists()


def test_timeout_kills_the_whole_group_with_its_background_grandchild(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "bg.pid"
    executor.start(run_task(tmp_path, "t", f"sleep 1000 & echo $! > {pidfile}; wait", timeout=0.5))
    grandchild = read_pid(pidfile)
    r = one(executor, "t")
    assert r.timed_out
    assert r.error == "timed out after 0.5s (SIGTERM)"
    assert r.signal == signal.SIGTERM
    assert not alive(grandchild)


def test_task_that_ignores_term_is_killed_after_the_grace(
    make_executor: Any, manual_clock: ManualClock, tmp_path: Path
) -> None:
    ex = make_executor(clock=manual_clock, kill_grace=10.0)
    ex.start(run_task(tmp_path, "t", "trap '' TERM; echo ready; sleep 1000", timeout=60))
    wait_log(ex, tmp_path, "t", "ready")
    manual_clock.advance(60)
    assert ex.poll(0.3) == []  # SIGTERM sent and ignored
    manual_clock.advance(10)
    r = one(ex, "t")
    assert r.timed_out
    assert r.signal == signal.SIGKILL
    assert r.error == "timed out after 1m (SIGTERM, then SIGKILL after 10s)"


def test_setsid_escapee_is_gone_when_the_task_ends(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "escapee.pid"
    executor.start(run_task(tmp_path, "t", f"setsid sleep 1000 & echo $! > {pidfile}"))
    r = one(executor, "t")
    assert r.ok
    escapee = read_pid(pidfile)
    assert not alive(escapee)


def test_escapee_with_a_cleared_environment_is_gone_too(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "escapee.pid"
    executor.start(
        run_task(tmp_path, "t", f"env -i /usr/bin/setsid sleep 1000 & echo $! > {pidfile}")
    )
    assert one(executor, "t").ok
    assert not alive(read_pid(pidfile))


def test_escapee_that_ignores_term_is_killed_before_the_result(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "escapee.pid"
    script = f"setsid sh -c \"trap '' TERM; echo \\$\\$ > {pidfile}; sleep 1000\" & wait"
    executor.start(run_task(tmp_path, "t", script, timeout=0.3))
    r = one(executor, "t")
    assert r.timed_out
    assert r.error == "timed out after 0.3s (SIGTERM, then SIGKILL after 0.5s)"
    assert not alive(read_pid(pidfile))


def test_cancel_ends_a_running_task(executor: PolledExecutor, tmp_path: Path) -> None:
    executor.start(run_task(tmp_path, "t", "echo started; sleep 1000"))
    wait_log(executor, tmp_path, "t", "started")
    executor.cancel("t")
    r = one(executor, "t")
    assert (r.cancelled, r.timed_out, r.ok) == (True, False, False)
    assert r.error == "cancelled (SIGTERM)"


def test_task_and_its_grandchild_are_pinned_to_the_task_cores(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    before = os.sched_getaffinity(0)
    command = (
        "grep Cpus_allowed_list /proc/$$/status; sh -c 'grep Cpus_allowed_list /proc/$$/status'"
    )
    executor.start(run_task(tmp_path, "t", command, cores=(1,)))
    assert one(executor, "t").ok
    assert log_of(tmp_path, "t").split() == ["Cpus_allowed_list:", "1"] * 2
    assert os.sched_getaffinity(0) == before


def new_children(before: set[int], recursive: bool = False) -> list[psutil.Process]:
    """This process's children (zombies included) that were not there `before`: an orphan
    an earlier test's killed daemon left to this subreaper is not this test's."""
    return [p for p in psutil.Process().children(recursive=recursive) if p.pid not in before]


def test_fifty_concurrent_tasks_are_all_reaped(executor: PolledExecutor, tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children()}
    keys = [f"t{i}" for i in range(50)]
    for key in keys:
        executor.start(run_task(tmp_path, key, ("true",)))
    got = results(executor, *keys)
    assert all(r.ok for r in got.values())
    assert new_children(before) == []


@pytest.mark.slow
def test_thousands_of_short_tasks_spawned_while_the_sweep_runs_all_succeed(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    """The sweep reads a child's stat, then its environment; a child the spawner just
    forked can exec in between. Such a child once looked like an orphan of a finished task
    and was killed (about 1 in 2,500 tasks at 32 at a time)."""
    total, at_once = 3000, 32
    for i in range(at_once):
        executor.start(run_task(tmp_path, f"t{i}", "true", cores=(i % 2,)))
    started, bad, done = at_once, [], 0
    deadline = time.monotonic() + 240
    while done < total and time.monotonic() < deadline:
        for r in executor.poll(1.0):
            done += 1
            if not r.ok:
                bad.append(r)
            if started < total:
                executor.start(run_task(tmp_path, f"t{started}", "true", cores=(started % 2,)))
                started += 1
    assert (done, bad) == (total, [])


LIMIT = 64 * 1024
NOTE = "\n--- chute: log capped at 64KiB; the rest of the output was discarded ---\n"


def test_output_past_the_log_limit_is_discarded_after_one_note(
    make_executor: Any, tmp_path: Path
) -> None:
    ex = make_executor(log_limit=LIMIT)
    ex.start(run_task(tmp_path, "t", f"head -c {3 * LIMIT} /dev/zero; echo tail >&2"))
    assert one(ex, "t").ok
    data = (tmp_path / "logs" / "t.log").read_bytes()
    assert len(data) == LIMIT + len(NOTE)
    assert data == b"\0" * LIMIT + NOTE.encode()


def test_log_limit_counts_what_earlier_attempts_left(make_executor: Any, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "t.log"
    log.parent.mkdir()
    log.write_bytes(b"e" * (LIMIT - 4))
    ex = make_executor(log_limit=LIMIT)
    ex.start(run_task(tmp_path, "t", "echo 123456789"))
    assert one(ex, "t").ok
    assert log.read_bytes() == b"e" * (LIMIT - 4) + b"1234" + NOTE.encode()


def test_task_that_closes_its_output_early_keeps_what_it_wrote(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    flag = tmp_path / "closed"
    executor.start(
        run_task(
            tmp_path, "t", f"echo before; echo err >&2; exec 1>&- 2>&-; touch {flag}; sleep 0.3"
        )
    )
    wait_for("the task to close its output", flag.exists)
    r = one(executor, "t")
    assert (r.ok, r.error) == (True, None)
    assert log_of(tmp_path, "t") == "before\nerr\n"


def test_grandchild_holding_the_output_open_does_not_delay_the_result(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "bg.pid"
    t0 = time.monotonic()
    executor.start(run_task(tmp_path, "t", f"echo start; sleep 1000 & echo $! > {pidfile}"))
    r = one(executor, "t")
    assert time.monotonic() - t0 < 2.0
    assert r.ok
    assert not alive(read_pid(pidfile))
    assert log_of(tmp_path, "t") == "start\n"


def test_call_log_past_the_limit_is_cut_back_after_the_call(
    make_executor: Any, tmp_path: Path
) -> None:
    write_module(tmp_path, "loud", f"def run():\n    print('x' * {3 * LIMIT})\n")
    ex = make_executor(log_limit=LIMIT)
    ex.start(call_task(tmp_path, "t", "loud:run"))
    assert one(ex, "t").ok
    assert (tmp_path / "logs" / "t.log").read_bytes() == b"x" * LIMIT + NOTE.encode()


def test_close_leaves_no_process_of_ours(make_executor: Any, tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ex = make_executor()
    write_module(tmp_path, "slow", "import time\ndef run():\n    time.sleep(1000)\n")
    ex.start(run_task(tmp_path, "a", "setsid sleep 1000 & sleep 1000"))
    ex.start(run_task(tmp_path, "b", "trap '' TERM; echo ready; sleep 1000"))
    ex.start(call_task(tmp_path, "c", "slow:run"))
    wait_log(ex, tmp_path, "b", "ready")
    ex.close()
    assert new_children(before, recursive=True) == []


# --- call: tasks ---------------------------------------------------------------------

CTX = Context(
    run_id="r1",
    stage="extract",
    artifacts="/tmp/artifacts",
    shard_index=None,
    shard_count=None,
    shard_item=None,
    cores=(0,),
)


def test_call_gets_its_kwargs_and_ctx_and_logs_to_its_log(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    write_module(
        tmp_path,
        "etl.mes",
        """
        import logging, os
        def extract(rows, ctx):
            print("printing", rows)
            logging.getLogger("etl").info("logging %s", ctx.stage)
            return {"rows": rows, "stage": ctx.stage, "env": os.environ["CHUTE_RUN_ID"],
                    "cwd": os.getcwd(), "cores": sorted(os.sched_getaffinity(0))}
        """,
    )
    task = call_task(
        tmp_path,
        "t",
        "etl.mes:extract",
        kwargs={"rows": 17},
        context=CTX,
        cores=(1,),
        env={"PATH": PATH, "CHUTE_RUN_ID": "r1"},
    )
    executor.start(task)
    r = one(executor, "t")
    assert (r.exit_code, r.error) == (0, None)
    assert r.output is not None
    assert orjson.loads(r.output) == {
        "rows": 17,
        "stage": "extract",
        "env": "r1",
        "cwd": str(tmp_path),
        "cores": [1],
    }
    text = log_of(tmp_path, "t")
    assert "printing 17\n" in text
    assert "INFO etl: logging extract" in text


def test_call_without_ctx_parameter_returning_none(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    write_module(tmp_path, "quiet", "def run(a, b):\n    assert a + b == 3\n")
    executor.start(call_task(tmp_path, "t", "quiet:run", kwargs={"a": 1, "b": 2}, context=CTX))
    r = one(executor, "t")
    assert (r.ok, r.output) == (True, None)


def test_call_that_raises_fails_with_one_line_and_a_logged_traceback(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    write_module(tmp_path, "bad", "def run():\n    raise ValueError('bad row 17\\nmore')\n")
    executor.start(call_task(tmp_path, "t", "bad:run"))
    r = one(executor, "t")
    assert (r.exit_code, r.error) == (1, "ValueError: bad row 17")
    assert "Traceback (most recent call last)" in log_of(tmp_path, "t")


def test_call_of_a_missing_module_names_it_and_sys_path(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    executor.start(call_task(tmp_path, "t", "etl.mes:extract"))
    r = one(executor, "t")
    assert r.error is not None
    assert r.error.startswith(
        f"cannot import 'etl.mes': no module named 'etl' (sys.path starts with '{tmp_path}', "
    )


def test_call_of_a_module_that_fails_to_import_says_why(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    write_module(tmp_path, "etl.mes", "import pandas_not_installed\ndef extract():\n    pass\n")
    executor.start(call_task(tmp_path, "t", "etl.mes:extract"))
    r = one(executor, "t")
    assert r.error == (
        "importing 'etl.mes' failed: ModuleNotFoundError: No module named 'pandas_not_installed'"
    )
    assert "import pandas_not_installed" in log_of(tmp_path, "t")


def test_call_of_a_missing_function(executor: PolledExecutor, tmp_path: Path) -> None:
    write_module(tmp_path, "etl.mes", "def load():\n    pass\n")
    executor.start(call_task(tmp_path, "t", "etl.mes:extract"))
    assert one(executor, "t").error == "module 'etl.mes' has no function 'extract'"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("return [1, 2]", "m:run returned a list; a call: function must return a dict or None"),
        (
            "return {'s': {1}}",
            "m:run returned a dict that is not JSON-serializable: "
            "Type is not JSON serializable: set",
        ),
        (
            "return {'s': 'x' * (1 << 20)}",
            "output is 1048584 bytes, over the 1 MiB limit; write the data to a file under "
            "$CHUTE_ARTIFACTS (ctx.artifacts) and return its path instead",
        ),
    ],
    ids=["not-a-dict", "not-serializable", "too-big"],
)
def test_call_return_value_must_be_a_small_json_dict(
    executor: PolledExecutor, tmp_path: Path, body: str, error: str
) -> None:
    write_module(tmp_path, "m", f"def run():\n    {body}\n")
    executor.start(call_task(tmp_path, "t", "m:run"))
    r = one(executor, "t")
    assert (r.exit_code, r.error, r.output, r.ok) == (0, error, None, False)


def test_worker_killed_mid_task_fails_that_task_only(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    write_module(
        tmp_path,
        "w",
        """
        import os, time
        def hang(pidfile):
            open(pidfile, "w").write(str(os.getpid()))
            time.sleep(1000)
        def pid():
            return {"pid": os.getpid()}
        """,
    )
    pidfile = tmp_path / "worker.pid"
    executor.start(call_task(tmp_path, "victim", "w:hang", kwargs={"pidfile": str(pidfile)}))
    executor.start(call_task(tmp_path, "bystander", "w:pid"))
    worker = read_pid(pidfile)
    bystander = one(executor, "bystander")
    assert bystander.ok
    os.kill(worker, signal.SIGKILL)
    r = one(executor, "victim")
    assert (r.exit_code, r.signal, r.lost) == (None, 9, False)
    assert r.error == "worker process died (killed by signal 9, SIGKILL) while running stage victim"
    executor.start(call_task(tmp_path, "next", "w:pid"))
    after = one(executor, "next")
    assert after.ok
    assert after.output is not None
    assert orjson.loads(after.output)["pid"] != worker


def test_call_timeout_stops_the_worker_and_the_next_call_runs(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    write_module(
        tmp_path, "s", "import time\ndef nap():\n    time.sleep(1000)\ndef ok():\n    pass\n"
    )
    executor.start(call_task(tmp_path, "t", "s:nap", timeout=0.5))
    r = one(executor, "t")
    assert (r.timed_out, r.signal) == (True, signal.SIGTERM)
    assert r.error == "timed out after 0.5s (SIGTERM)"
    executor.start(call_task(tmp_path, "u", "s:ok"))
    assert one(executor, "u").ok


def test_cancel_of_a_call(executor: PolledExecutor, tmp_path: Path) -> None:
    write_module(
        tmp_path, "s", "import time\ndef nap(f):\n    open(f, 'w').close()\n    time.sleep(1000)\n"
    )
    flag = tmp_path / "started"
    executor.start(call_task(tmp_path, "t", "s:nap", kwargs={"f": str(flag)}))
    wait_for("the call to start", flag.exists)
    executor.cancel("t")
    r = one(executor, "t")
    assert (r.cancelled, r.error) == (True, "cancelled (SIGTERM)")


def test_process_started_by_a_call_does_not_outlive_it(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    write_module(
        tmp_path,
        "spawner",
        """
        import subprocess
        def run():
            p = subprocess.Popen(["sleep", "1000"])
            return {"pid": p.pid}
        """,
    )
    executor.start(call_task(tmp_path, "t", "spawner:run"))
    r = one(executor, "t")
    assert r.ok
    assert r.output is not None
    assert not alive(orjson.loads(r.output)["pid"])


def test_unwritable_log_is_a_failed_result(executor: PolledExecutor, tmp_path: Path) -> None:
    (tmp_path / "logs").write_text("a file where the log folder should be")
    executor.start(run_task(tmp_path, "t", "true"))
    log = tmp_path / "logs" / "t.log"
    assert one(executor, "t").error == f"cannot open log {log}: Not a directory"


def test_queued_call_waits_for_a_free_worker_and_can_be_cancelled(
    make_executor: Any, tmp_path: Path
) -> None:
    ex = make_executor(max_workers=1)
    write_module(tmp_path, "q", "import time\ndef nap(s):\n    time.sleep(s)\n")
    ex.start(call_task(tmp_path, "first", "q:nap", kwargs={"s": 0.3}))
    ex.start(call_task(tmp_path, "second", "q:nap", kwargs={"s": 0}))
    ex.start(call_task(tmp_path, "third", "q:nap", kwargs={"s": 0}))
    ex.cancel("third")
    got = results(ex, "first", "second", "third")
    assert got["first"].ok
    assert got["second"].ok
    assert (got["third"].cancelled, got["third"].error) == (True, "cancelled before it started")


def gated_calls(tmp: Path) -> Path:
    """Module `g`: `g:run(name, s=0)` touches tmp/name, waits for the returned gate file,
    sleeps `s` and returns its worker's pid."""
    gate = tmp / "gate"
    source = f"""
        import os, pathlib, time
        def run(name, s=0):
            pathlib.Path({str(tmp)!r}, name).touch()
            while not os.path.exists({str(gate)!r}):
                time.sleep(0.01)
            time.sleep(s)
            return {{"pid": os.getpid()}}
    """
    write_module(tmp, "g", textwrap.dedent(source))
    return gate


def pids_of(got: dict[str, Result]) -> dict[str, int]:
    return {k: int(orjson.loads(r.output or b"{}")["pid"]) for k, r in got.items()}


def test_a_reconfigured_pool_grows_at_once_and_ends_idle_workers_beyond_its_size(
    make_executor: Any, tmp_path: Path
) -> None:
    ex = make_executor(max_workers=1)
    gate = gated_calls(tmp_path)
    ex.start(call_task(tmp_path, "a", "g:run", kwargs={"name": "a-started"}))
    ex.start(call_task(tmp_path, "b", "g:run", kwargs={"name": "b-started"}))
    wait_for("a to start", (tmp_path / "a-started").exists)
    assert not (tmp_path / "b-started").exists()  # one worker, and a holds it until the gate
    ex.configure(kill_grace=10.0, log_limit=1 << 20, max_workers=2)
    wait_for("b to start beside a", (tmp_path / "b-started").exists)
    gate.touch()
    pids = list(pids_of(results(ex, "a", "b")).values())
    assert pids[0] != pids[1]
    assert all(alive(p) for p in pids)  # both idle, kept
    ex.configure(kill_grace=10.0, log_limit=1 << 20, max_workers=1)
    wait_for("one idle worker to end", lambda: [alive(p) for p in pids].count(True) == 1)


def test_a_pool_shrunk_while_busy_runs_its_backlog_on_one_worker(
    make_executor: Any, tmp_path: Path
) -> None:
    ex = make_executor(max_workers=2)
    gate = gated_calls(tmp_path)
    for key in ("a", "b"):
        ex.start(call_task(tmp_path, key, "g:run", kwargs={"name": key}))
    wait_for("a and b to run", lambda: (tmp_path / "a").exists() and (tmp_path / "b").exists())
    ex.configure(kill_grace=10.0, log_limit=1 << 20, max_workers=1)
    for key in ("c", "d"):
        ex.start(call_task(tmp_path, key, "g:run", kwargs={"name": key, "s": 0.3}))
    gate.touch()
    pid = pids_of(results(ex, "a", "b", "c", "d"))
    assert pid["c"] == pid["d"]  # one worker left: c and d one after the other
    [other] = {pid["a"], pid["b"]} - {pid["c"]}
    wait_for("the other worker to end", lambda: not alive(other))


@pytest.mark.parametrize("kind", ["run", "call"])
def test_task_folders_are_made_before_it_starts(
    executor: PolledExecutor, tmp_path: Path, kind: str
) -> None:
    stage = tmp_path / "stages" / "s"
    folders = (str(tmp_path / "stages"), str(stage), str(stage / "artifacts"))
    (tmp_path / "stages").mkdir()  # one of them is there already: fine
    if kind == "run":
        task = run_task(tmp_path, "t", "pwd; ls", cwd=str(stage), folders=folders)
    else:
        write_module(tmp_path, "where", "import os\ndef run():\n    return {'cwd': os.getcwd()}\n")
        env = {"PATH": PATH, "PYTHONPATH": str(tmp_path)}
        task = call_task(tmp_path, "t", "where:run", folders=folders, cwd=str(stage), env=env)
    executor.start(task)
    r = one(executor, "t")
    assert r.error is None
    assert (stage / "artifacts").is_dir()
    if kind == "run":
        assert log_of(tmp_path, "t") == f"{stage}\nartifacts\n"
    else:
        assert r.output is not None
        assert orjson.loads(r.output) == {"cwd": str(stage)}


@pytest.mark.parametrize("kind", ["run", "call"])
def test_folder_that_cannot_be_made_is_a_failed_result(
    executor: PolledExecutor, tmp_path: Path, kind: str
) -> None:
    (tmp_path / "stages").write_text("a file where a folder should be")
    folders = (str(tmp_path / "stages" / "s"),)
    make = run_task if kind == "run" else call_task
    executor.start(make(tmp_path, "t", "true" if kind == "run" else "m:f", folders=folders))
    assert one(executor, "t").error == f"cannot make folder {folders[0]}: Not a directory"


def test_a_worker_runs_each_call_on_that_calls_cores(make_executor: Any, tmp_path: Path) -> None:
    """A worker stays where its last call ran; the next call moves it if it needs to, and a
    call without cores gets every CPU the worker had at its start."""
    ex = make_executor(max_workers=1)
    write_module(
        tmp_path,
        "where",
        "import os\ndef run():\n    return {'cores': sorted(os.sched_getaffinity(0))}\n",
    )
    everything = sorted(os.sched_getaffinity(0))
    seen = []
    for i, cores in enumerate([(1,), (1,), (), (0,)]):
        ex.start(call_task(tmp_path, f"t{i}", "where:run", cores=cores))
        r = one(ex, f"t{i}")
        assert r.output is not None, r.error
        seen.append(orjson.loads(r.output)["cores"])
    assert seen == [[1], [1], everything, [0]]


def test_an_idle_worker_already_on_the_calls_cores_takes_it(
    make_executor: Any, tmp_path: Path
) -> None:
    ex = make_executor(max_workers=2)
    write_module(
        tmp_path,
        "who",
        "import os, time\ndef run(s):\n    time.sleep(s)\n    return {'pid': os.getpid()}\n",
    )

    def pid_of(r: Result) -> int:
        assert r.output is not None, r.error
        return int(orjson.loads(r.output)["pid"])

    ex.start(call_task(tmp_path, "a", "who:run", cores=(0,), kwargs={"s": 0.3}))
    ex.start(call_task(tmp_path, "b", "who:run", cores=(1,), kwargs={"s": 0.3}))
    both = results(ex, "a", "b")
    on = {0: pid_of(both["a"]), 1: pid_of(both["b"])}
    assert on[0] != on[1]
    for i, core in enumerate([1, 0, 0, 1]):
        ex.start(call_task(tmp_path, f"t{i}", "who:run", cores=(core,), kwargs={"s": 0}))
        assert pid_of(one(ex, f"t{i}")) == on[core]


@pytest.fixture
def full_fs(tmp_path: Path) -> Any:
    """A tmpfs of 64 inodes, all used: making a folder there fails with ENOSPC."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    with tmpfs(mnt, "size=1m,nr_inodes=64"):
        with contextlib.suppress(OSError):
            for i in range(1000):
                (mnt / f"f{i}").touch()
        yield mnt


@pytest.mark.parametrize("kind", ["run", "call"])
def test_folders_that_find_no_room_lose_the_task_uncharged(
    executor: PolledExecutor, tmp_path: Path, full_fs: Path, kind: str
) -> None:
    folder = full_fs / "stage"
    make = run_task if kind == "run" else call_task
    executor.start(make(tmp_path, "t", "true" if kind == "run" else "m:f", folders=(str(folder),)))
    r = one(executor, "t")
    assert r.error == f"cannot make folder {folder}: No space left on device"
    assert (r.lost, r.no_room) == (True, errno.ENOSPC)


def mark_for(stage_dir: Path, run_dir: Path) -> Mark:
    return Mark(
        path=str(stage_dir / "output.json"),
        run_dir=str(run_dir),
        stage="s",
        version="3",
        input_hash="in",
        started_at=time.time(),
    )


def test_a_succeeded_call_leaves_its_done_mark(executor: PolledExecutor, tmp_path: Path) -> None:
    stage = tmp_path / "run" / "stages" / "s"
    write_module(
        tmp_path,
        "m",
        """
        import os
        def run(ctx):
            open(os.path.join(ctx.artifacts, "a.csv"), "w").close()
            return {"n": 1}
        """,
    )
    ctx = Context("r", "s", str(stage / "artifacts"), None, None, None, ())
    folders = (str(tmp_path / "run"), str(tmp_path / "run" / "stages"), str(stage), ctx.artifacts)
    mark = mark_for(stage, tmp_path / "run")
    executor.start(call_task(tmp_path, "t", "m:run", context=ctx, folders=folders, mark=mark))
    r = one(executor, "t")
    assert r.ok, r.error
    assert r.done == (stage / "output.json").read_bytes()
    doc = orjson.loads(r.done)
    assert doc["data"] == {"n": 1}
    assert doc["artifacts"] == [{"name": "a.csv", "path": "artifacts/a.csv", "type": "text/csv"}]
    meta = doc["_meta"]
    assert (meta["stage"], meta["version"], meta["input_hash"]) == ("s", "3", "in")
    assert meta["output_hash"] == r.output_hash == outputs.data_hash({"n": 1})
    assert 0 <= meta["duration_seconds"] < 20


def test_a_call_whose_artifact_links_out_fails_and_leaves_no_mark(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    stage = tmp_path / "run" / "stages" / "s"
    (stage / "artifacts").mkdir(parents=True)
    (stage / "artifacts" / "passwd").symlink_to("/etc/passwd")
    write_module(tmp_path, "m", "def run():\n    return {'n': 1}\n")
    mark = mark_for(stage, tmp_path / "run")
    executor.start(call_task(tmp_path, "t", "m:run", mark=mark))
    r = one(executor, "t")
    assert not r.ok
    assert r.error is not None
    assert r.error.startswith("artifact 'passwd' links outside the run folder")
    assert r.done is None
    assert not (stage / "output.json").exists()


# --- a task's files are hostile input ---------------------------------------------------


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_folder(path: Path) -> None:
    path.mkdir()


def make_link(path: Path) -> None:
    path.symlink_to("/etc/passwd")


REPLACED = {
    "fifo": (make_fifo, "a FIFO"),
    "folder": (make_folder, "a directory"),
    "link": (make_link, "a symbolic link"),
}


@pytest.mark.parametrize("kind", ["run", "call"])
@pytest.mark.parametrize("replaced", list(REPLACED), ids=list(REPLACED))
def test_a_log_a_task_replaced_fails_the_next_task_at_once_and_is_left_alone(
    executor: PolledExecutor, tmp_path: Path, kind: str, replaced: str
) -> None:
    """A FIFO there must not block the spawner thread or the worker in open(), nor a link
    send a task's output elsewhere."""
    make, what = REPLACED[replaced]
    log = tmp_path / "logs" / "t.log"
    log.parent.mkdir()
    make(log)
    passwd = Path("/etc/passwd").read_bytes()
    write_module(tmp_path, "m", "def f():\n    print('hello')\n")
    task = (
        run_task(tmp_path, "t", "echo hello") if kind == "run" else call_task(tmp_path, "t", "m:f")
    )
    executor.start(task)
    assert one(executor, "t").error == (
        f"log {log} is {what}, not a regular file; remove it so the stage's output can be "
        "logged there"
    )
    assert Path("/etc/passwd").read_bytes() == passwd


def test_a_call_that_makes_its_log_a_fifo_is_not_waited_on_when_its_log_is_capped(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "t.log"
    write_module(
        tmp_path,
        "m",
        f"""
        import os
        def f():
            os.unlink({str(log)!r})
            os.mkfifo({str(log)!r})
            return {{"n": 1}}
        """,
    )
    executor.start(call_task(tmp_path, "t", "m:f"))
    r = one(executor, "t")
    assert r.ok, r.error
    assert log.is_fifo()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become the user nobody")
def test_an_artifacts_folder_the_daemon_cannot_read_fails_the_attempt(tmp_path: Path) -> None:
    """chmod 000 as a daemon that is not root meets it (root reads it all the same)."""
    base = Path(tempfile.mkdtemp(prefix="chute-eacces-"))  # /tmp: nobody can reach it
    try:
        base.chmod(0o755)
        stage = base / "run" / "stages" / "s"
        (stage / "artifacts").mkdir(parents=True)
        (stage / "artifacts" / "a.csv").write_text("x")
        (stage / "artifacts").chmod(0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: as nobody, scan and report
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                listing, problem = outputs.scan_artifacts(stage / "artifacts", stage, base / "run")
                os.write(w, orjson.dumps([listing, problem]))
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            got = orjson.loads(f.read())
        os.waitpid(pid, 0)
    finally:
        (base / "run" / "stages" / "s" / "artifacts").chmod(0o755)
        shutil.rmtree(base)
    assert got == [[], f"cannot list $CHUTE_ARTIFACTS {stage / 'artifacts'}: Permission denied"]


def test_a_task_cancelled_before_its_spawn_is_registered_ends_cancelled(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    executor.start(run_task(tmp_path, "t", "sleep 30"))
    executor.cancel("t")  # the spawner thread may not even have started it yet
    r = one(executor, "t", timeout=15)
    assert r.cancelled
    assert r.error is not None
    assert r.error.startswith("cancelled")


def test_spawner_threads_are_kept_for_the_most_recent_core_sets(
    make_executor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("chute.execution.spawners.MAX_SPAWNERS", 2)
    ex = make_executor()

    def spawners() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("chute-spawn-"))

    for i, cores in enumerate([(0,), (1,), (0, 1), (), (1,)]):
        ex.start(run_task(tmp_path, f"t{i}", "true", cores=cores))
        assert one(ex, f"t{i}").ok
        # A retired spawner's thread ends on its own once its queue is empty: wait for that,
        # then there are never more than two.
        wait_for("retired spawner threads to end", lambda: len(spawners()) <= 2)
    assert spawners() == ["chute-spawn-1", "chute-spawn-any"]


def test_a_cancelled_task_that_could_not_start_ends_cancelled(
    executor: PolledExecutor, tmp_path: Path
) -> None:
    executor.start(run_task(tmp_path, "t", "true", cwd=str(tmp_path / "gone")))
    executor.cancel("t")  # before any poll: the spawn's outcome is not registered yet
    r = one(executor, "t")
    assert (r.cancelled, r.error) == (True, "cancelled before it started")


def test_a_retired_spawner_still_starts_what_it_was_given(
    make_executor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each start below needs another core set than the one before, so with one spawner
    kept, each retires the last while its task may still wait in its queue."""
    monkeypatch.setattr("chute.execution.spawners.MAX_SPAWNERS", 1)
    ex = make_executor()
    keys = [f"t{i}" for i in range(12)]
    for i, key in enumerate(keys):
        ex.start(run_task(tmp_path, key, "true", cores=(i % 2,)))
    got = results(ex, *keys)
    assert all(r.ok for r in got.values()), [r.error for r in got.values() if not r.ok]
