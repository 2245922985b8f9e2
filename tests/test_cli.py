"""The CLI's surface: help texts, validate's output and exit codes, live progress on a tty."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from conftest import EXAMPLES, Chute, chute_env, load_json

COMMANDS = ["validate", "run", "show", "logs", "retry", "schema"]


@pytest.mark.parametrize("command", COMMANDS, ids=COMMANDS)
def test_help_starts_with_a_synopsis_and_one_example(chute: Chute, command: str) -> None:
    done = chute(command, "--help")
    assert done.code == 0
    description = done.out.split("\n\n")[1]
    assert description.startswith(f"chute {command}")
    assert f"example:\n  chute {command}" in done.out


def test_validate_prints_the_stage_plan_for_a_good_file(chute: Chute) -> None:
    done = chute("validate", str(EXAMPLES / "etl.yaml"))
    assert done.code == 0
    lines = done.out.splitlines()
    assert lines[0] == f"{EXAMPLES / 'etl.yaml'}: ok: Pipeline seed-etl, 7 stages, runs now"
    assert "  mat_order_facts: run: " in done.out
    assert "(cpus=1, after raw_orders)" in done.out


def test_validate_reports_every_file_and_exits_2_if_one_is_bad(
    chute: Chute, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: bad}\nspec:\n  run: 'true'\n"
        "  cpus: 0\n  timeout: soon\n"
    )
    done = chute("validate", str(EXAMPLES / "hello.yaml"), str(bad))
    assert done.code == 2
    assert "hello.yaml: ok: Job hello" in done.out
    errors = done.err.splitlines()
    assert errors[0].startswith(f"{bad}:6: spec.cpus: ")
    assert errors[1].startswith(f"{bad}:7: spec.timeout: ")
    assert "30s" in errors[1]


def test_validate_refuses_more_cpus_than_the_node_has(chute: Chute, tmp_path: Path) -> None:
    spec = tmp_path / "wide.yaml"
    ncpu = len(os.sched_getaffinity(0))
    spec.write_text(
        f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: wide}}\n"
        f"spec:\n  run: 'true'\n  cpus: {ncpu + 1}\n"
    )
    done = chute("validate", str(spec))
    assert done.code == 2
    assert f"{spec}:6: spec.cpus: " in done.err
    assert str(ncpu) in done.err


def test_a_bad_config_is_an_input_error(chute: Chute, tmp_path: Path) -> None:
    config = tmp_path / "chute.yaml"
    config.write_text("polcy: best-fit\n")
    done = chute("validate", str(EXAMPLES / "hello.yaml"), "--config", str(config))
    assert done.code == 2
    assert done.err.startswith(f"{config}: polcy: unknown key")
    assert "did you mean 'policy'?" in done.err


def test_run_on_a_terminal_shows_live_progress(spool: Path) -> None:
    """A real pty: the progress line is rewritten in place and ends with every stage done."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chute", "run", str(EXAMPLES / "etl.yaml"), "--spool", str(spool)],
        stdin=follower,
        stdout=follower,
        stderr=subprocess.DEVNULL,
        env=chute_env(),
    )
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(leader)
        assert proc.wait(timeout=30) == 0
    text = out.decode(errors="replace")
    assert "\r" in text
    assert "seed-etl" in text
    assert "7/7 done, 0 running, 0 waiting, 0 failed" in text


def test_submit_places_all_files_or_none_and_never_a_name_the_daemon_ignores(
    spool: Path, chute: Chute, tmp_path: Path
) -> None:
    good = (EXAMPLES / "hello.yaml").read_text()
    (tmp_path / ".hidden.yaml").write_text(good)
    (tmp_path / "also.yaml").write_text(good)
    (tmp_path / "bad.yaml").write_text("apiVersion: chute/v1\nkind: Job\n")
    refused = chute("submit", str(tmp_path / "also.yaml"), str(tmp_path / "bad.yaml"))
    assert refused.code == 2
    assert "nothing submitted" in refused.err
    assert not (spool / "incoming").exists() or not os.listdir(spool / "incoming")
    placed = chute("submit", str(tmp_path / ".hidden.yaml"))
    assert placed.code == 0, placed.err
    assert sorted(os.listdir(spool / "incoming")) == ["hidden.yaml"]


SPOOL_COMMANDS: dict[str, tuple[str, ...]] = {
    "validate": (str(EXAMPLES / "hello.yaml"),),
    "run": (str(EXAMPLES / "hello.yaml"),),
    "show": ("latest",),
    "logs": ("latest",),
    "retry": ("latest",),
    "daemon": (),
    "submit": (str(EXAMPLES / "hello.yaml"),),
    "status": (),
    "runs": (),
    "cancel": ("latest",),
    "schedules": (),
    "unschedule": ("nightly",),
    "gc": (),
    "schema": ("spec",),
}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chute", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=chute_env(),
    )


@pytest.mark.parametrize("command", list(SPOOL_COMMANDS), ids=list(SPOOL_COMMANDS))
@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.slow
def test_config_and_spool_mean_the_same_before_or_after_the_command(
    tmp_path: Path, command: str, where: str
) -> None:
    """A config that cannot be read stops every command, wherever --config is written: it
    is read, not silently replaced by the command's own default."""
    options = ["--config", str(tmp_path / "missing.yaml"), "--spool", str(tmp_path / "sp")]
    args = [command, *SPOOL_COMMANDS[command]]
    done = _cli(*options, *args) if where == "before" else _cli(*args, *options)
    assert (done.returncode, done.stderr) == (
        2,
        f"{tmp_path / 'missing.yaml'}: cannot read the config: No such file or directory\n",
    )


@pytest.mark.parametrize("where", ["before", "after", "both"])
def test_the_spool_given_before_the_command_is_the_one_used(tmp_path: Path, where: str) -> None:
    spool = str(tmp_path / "sp")
    if where == "before":
        done = _cli("--spool", spool, "status")
    elif where == "after":
        done = _cli("status", "--spool", spool)
    else:  # the later one wins, as with any repeated option
        done = _cli("--spool", str(tmp_path / "other"), "status", "--spool", spool)
    assert (done.returncode, done.stdout) == (3, f"chute daemon is not running on {spool}\n")


def test_verbose_before_or_after_the_command_shows_debug_lines(tmp_path: Path) -> None:
    spool = str(tmp_path / "sp")
    plain = _cli("--spool", spool, "run", str(EXAMPLES / "hello.yaml"))
    before = _cli("-v", "--spool", spool, "run", str(EXAMPLES / "hello.yaml"))
    after = _cli("run", str(EXAMPLES / "hello.yaml"), "--spool", spool, "-v")
    assert plain.returncode == before.returncode == after.returncode == 0
    assert " DEBUG " not in plain.stderr
    assert " DEBUG " in before.stderr
    assert " DEBUG " in after.stderr


def test_quiet_before_the_command_keeps_info_lines_out(tmp_path: Path) -> None:
    spool = str(tmp_path / "sp")
    loud = _cli("--spool", spool, "run", str(EXAMPLES / "hello.yaml"))
    quiet = _cli("-q", "--spool", spool, "run", str(EXAMPLES / "hello.yaml"))
    assert loud.returncode == quiet.returncode == 0
    assert " INFO " in loud.stderr
    assert quiet.stderr == ""


def test_a_stage_named_total_is_not_mistaken_for_the_tally_and_shard_logs_by_name(
    tmp_path: Path,
) -> None:
    spool = str(tmp_path / "sp")
    assert _cli("run", str(EXAMPLES / "shards.yaml"), "--spool", spool).returncode == 0
    show = _cli("show", "latest", "--spool", spool).stdout.splitlines()
    tally = next(i for i, line in enumerate(show) if line.startswith("stages: "))
    assert [line.split()[0] for line in show[2:tally] if not line.startswith(" ")] == [
        "measure",
        "total",
        "report",
    ]
    assert show[tally].startswith("stages: 3 succeeded; run took ")
    shard = _cli("logs", "latest", "measure[1]", "--spool", spool)
    assert shard.returncode == 0
    assert shard.stdout.strip() != ""
    assert (
        shard.stdout
        == _cli("logs", "latest", "measure", "--spool", spool)
        .stdout.split("==> measure[2] <==\n")[0]
        .split("==> measure[1] <==\n")[1]
    )
    missing = _cli("logs", "latest", "measure[9]", "--spool", spool)
    assert (missing.returncode, missing.stderr.split(": ", 1)[1]) == (
        2,
        f"no log of shard 9 of stage measure in {Path(show[0].split()[1]).name}\n",
    )


def test_logs_a_task_replaced_are_named_not_followed_or_blocked_on(
    tmp_path: Path, write_spec: Callable[[str, str], Path]
) -> None:
    """A task may put a FIFO or a link where its log was, or a file among the stage
    folders: `chute logs` prints the other logs, says what it found in one line each and
    exits 1, instead of blocking on the FIFO, printing what the link points at, or a
    traceback."""
    secret = tmp_path / "secret"
    secret.write_text("canary-secret\n")
    stages = '"$CHUTE_RUN_DIR/stages"'
    spec = write_spec(
        "hostile.yaml",
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: hostile}\nspec:\n  stages:\n"
        "    - name: good\n      run: echo good-line\n"
        f"    - name: fifo\n      run: rm {stages}/fifo/log && mkfifo {stages}/fifo/log\n"
        f"    - name: link\n      run: rm {stages}/link/log && ln -s {secret} {stages}/link/log\n"
        f"    - name: stray\n      run: echo x > {stages}/not-a-folder\n",
    )
    spool = str(tmp_path / "sp")
    assert _cli("run", str(spec), "--spool", spool).returncode == 0
    (run_dir,) = (tmp_path / "sp" / "runs").glob("2*")
    rule = "not printed: chute reads a log only from a regular file"
    fifo = f"{run_dir}/stages/fifo/log: is a FIFO, not a regular file; {rule}"
    link = f"{run_dir}/stages/link/log: is a symbolic link, not a regular file; {rule}"

    every = _cli("logs", "latest", "--spool", spool)
    assert (every.returncode, every.stderr.splitlines()) == (1, [fifo, link])
    assert "==> good <==\ngood-line\n" in every.stdout
    assert "canary-secret" not in every.stdout

    followed = _cli("logs", "latest", "-f", "--spool", spool)
    assert (followed.returncode, followed.stderr.splitlines()) == (1, [fifo, link])
    assert "good: good-line\n" in followed.stdout
    assert "canary-secret" not in followed.stdout

    one = _cli("logs", "latest", "fifo", "--spool", spool)
    assert (one.returncode, one.stdout, one.stderr) == (1, "", fifo + "\n")


def test_validate_shows_scripts_on_one_line_and_argv_as_a_shell_would(
    chute: Chute, write_spec: Callable[[str, str], Path]
) -> None:
    path = write_spec(
        "p.yaml",
        "apiVersion: chute/v1\nkind: Pipeline\nmetadata: {name: p}\nspec:\n  stages:\n"
        "    - name: script\n      run: |\n        set -e\n        echo one\n        echo two\n"
        "    - name: argv\n      run: [python3, -c, 'print(\"a b\")']\n",
    )
    done = chute("validate", str(path))
    assert done.code == 0
    assert done.out.splitlines()[1:] == [
        "  script: run: set -e  (+2 more lines) (cpus=1)",
        "  argv: run: python3 -c 'print(\"a b\")' (cpus=1)",
    ]


# -- names from the command line -------------------------------------------------------------

QUEUED = "20261122_101500_a1b2c3"
RUN_HINT = (
    "give a run id (like 20261122_101500_a1b2c3), a prefix of one, latest, or <pipeline>/latest"
)
NAME_HINT = (
    "a name of lowercase letters, digits, '.', '_' or '-' (starting with a letter or digit, "
    "at most 63), like nightly-etl"
)


def _fake_run(folder: Path, run_id: str, state: str) -> None:
    """A run folder as the daemon leaves it (run.json, spec.yaml), written by hand."""
    (folder / "stages").mkdir(parents=True)
    (folder / "spec.yaml").write_text(
        "apiVersion: chute/v1\nkind: Job\nmetadata: {name: victim}\nspec:\n  run: 'true'\n"
    )
    (folder / "run.json").write_bytes(
        orjson.dumps(
            {
                "run_id": run_id,
                "pipeline": "victim",
                "kind": "Job",
                "state": state,
                "trigger": {"type": "drop", "source": "incoming/victim.yaml"},
                "created_at": "2026-11-22T10:15:00.000Z",
                "finished_at": None,
                "run_date": "2026-11-22",
            }
        )
    )


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every path under `root` with its bytes (or its link target): a snapshot to compare."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def targets(spool: Path, tmp_path: Path) -> Path:
    """A spool with a run waiting in queue/, and beside the spool a canary folder that a
    name leading out of the spool would reach: a run-like folder, a `latest` link to it, a
    schedule-like file and a stage log."""
    _fake_run(spool / "runs" / QUEUED, QUEUED, "queued")
    (spool / "queue").mkdir()
    (spool / "queue" / f"{QUEUED}.yaml").write_text("waiting")
    (spool / "schedules").mkdir()
    canary = tmp_path / "canary"
    _fake_run(canary / "run", QUEUED, "queued")
    os.symlink(canary / "run", canary / "latest")
    (canary / "x.yaml").write_text("keep me")
    (canary / "log").write_text("SECRET\n")
    return canary


HOSTILE_ARGS = {
    "cancel-traversal": (
        ["cancel", f"../queue/{QUEUED}"],
        f"../queue/{QUEUED}: not a run; {RUN_HINT}",
    ),
    "cancel-outside-latest": (
        ["cancel", "{canary}/latest"],
        "{canary}/latest: not a run; " + RUN_HINT,
    ),
    "cancel-empty": (["cancel", ""], f"'': not a run; {RUN_HINT}"),
    "show-traversal": (["show", "../../canary/run"], f"../../canary/run: not a run; {RUN_HINT}"),
    "logs-run-dotdot": (["logs", ".."], f"..: not a run; {RUN_HINT}"),
    "logs-stage-traversal": (
        ["logs", QUEUED, "../../../canary"],
        f"../../../canary: not a stage name; {NAME_HINT}",
    ),
    "retry-outside-latest": (
        ["retry", "{canary}/latest"],
        "{canary}/latest: not a run; " + RUN_HINT,
    ),
    "retry-from-traversal": (
        ["retry", QUEUED, "--from", "../x"],
        f"../x: not a stage name; {NAME_HINT}",
    ),
    "unschedule-traversal": (
        ["unschedule", f"../queue/{QUEUED}"],
        f"../queue/{QUEUED}: not a schedule name; {NAME_HINT}",
    ),
    "unschedule-absolute": (
        ["unschedule", "{canary}/x"],
        "{canary}/x: not a schedule name; " + NAME_HINT,
    ),
}


@pytest.mark.parametrize(("args", "message"), HOSTILE_ARGS.values(), ids=HOSTILE_ARGS.keys())
@pytest.mark.slow
def test_a_name_of_the_wrong_form_is_refused_before_it_touches_a_file(
    spool: Path, chute: Chute, targets: Path, args: list[str], message: str
) -> None:
    before_spool, before_canary = _tree(spool), _tree(targets)
    done = chute(*[a.replace("{canary}", str(targets)) for a in args])
    assert (done.code, done.out) == (2, "")
    assert done.err == message.replace("{canary}", str(targets)) + "\n"
    assert _tree(targets) == before_canary
    assert _tree(spool) == before_spool  # the queued run and its queue file untouched


def test_cancel_without_a_daemon_uses_the_run_folders_name_not_its_run_json(
    spool: Path, chute: Chute, targets: Path
) -> None:
    """run.json is data: a run_id field naming another run never decides what is changed."""
    other = "20261122_101501_000000"
    _fake_run(spool / "runs" / other, QUEUED, "queued")  # says it is QUEUED
    (spool / "queue" / f"{other}.yaml").write_text("waiting")
    done = chute("cancel", other)
    assert (done.code, done.out) == (0, f"{other} cancelled\n")
    assert load_json(spool / "runs" / other / "run.json")["state"] == "cancelled"
    assert not (spool / "queue" / f"{other}.yaml").exists()
    assert (spool / "queue" / f"{QUEUED}.yaml").exists()
    assert load_json(spool / "runs" / QUEUED / "run.json")["state"] == "queued"


# -- gc --------------------------------------------------------------------------------------


def _finished_runs(spool: Path, count: int) -> list[str]:
    ids = [f"20260101_{i // 60:04d}{i % 60:02d}_000000" for i in range(count)]
    for run_id in ids:
        _fake_run(spool / "runs" / run_id, run_id, "succeeded")
        for j in range(10):
            (spool / "runs" / run_id / "stages" / f"s{j}").mkdir()
            (spool / "runs" / run_id / "stages" / f"s{j}" / "log").write_text("x" * 100)
    os.symlink(ids[-1], spool / "runs" / "latest")
    return ids


def test_concurrent_gc_runs_each_remove_a_run_once_and_never_crash(
    spool: Path, tmp_path: Path
) -> None:
    ids = _finished_runs(spool, 300)
    config = tmp_path / "chute.yaml"
    config.write_text("retention: {keep_runs: 0, max_age: 1s}\n")
    cmd = [sys.executable, "-m", "chute", "gc", "--spool", str(spool), "--config", str(config)]
    procs = [
        subprocess.Popen(cmd, env=chute_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    removed = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert (p.returncode, err) == (0, b""), err.decode()
        removed += int(out.split()[1])
    assert removed == len(ids) - 1  # each run removed by exactly one of them; latest kept
    assert sorted(os.listdir(spool / "runs")) == [ids[-1], "latest"]


def test_a_gc_killed_mid_delete_is_finished_by_the_next_one(
    spool: Path, chute: Chute, tmp_path: Path
) -> None:
    ids = _finished_runs(spool, 5)
    config = tmp_path / "chute.yaml"
    config.write_text("retention: {keep_runs: 0, max_age: 1s}\n")
    killed = chute("gc", "--config", str(config), env={"CHUTE_CRASH_AT": "gc.renamed:2"})
    assert killed.code == -9
    assert sorted(os.listdir(spool / "runs")) == [f".gc-{ids[1]}", *ids[2:], "latest"]
    done = chute("gc", "--config", str(config))
    assert (done.code, done.err) == (0, "")
    assert done.out.startswith("removed 2 run(s)")  # the leftover is finished, not counted
    assert sorted(os.listdir(spool / "runs")) == [ids[-1], "latest"]
