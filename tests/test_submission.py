"""`chute submit` learns what the daemon made of the very file it placed: its run, its
schedule or its rejection, by the file's identity, whatever else was dropped under its name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from chute.intake.filenames import file_id
from conftest import EXAMPLES, Chute, chute_env, load_json
from daemon_proc import Daemon, daemon_factory, job, runs_of

__all__ = ["daemon_factory"]  # a fixture, used by name

ACCEPTED = re.compile(r"^incoming/(\S+) accepted as run (\S+)$", re.MULTILINE)


def _accepted(out: str) -> tuple[str, str]:
    """(name in incoming/, run id) from submit's output."""
    found = ACCEPTED.search(out)
    assert found is not None, out
    return found.group(1), found.group(2)


def test_submit_prints_the_run_its_file_became_and_without_a_daemon_where_it_waits(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    alone = chute("submit", str(EXAMPLES / "hello.yaml"))
    assert (alone.code, alone.out) == (
        0,
        f"submitted {EXAMPLES / 'hello.yaml'} as incoming/hello.yaml\n"
        f"no chute daemon runs on {spool}: the file waits in incoming/ until one starts\n",
    )
    waiting = os.stat(spool / "incoming" / "hello.yaml")
    d = daemon_factory().start()
    done = chute("submit", str(EXAMPLES / "hello.yaml"))
    assert done.code == 0, done.err
    name, run_id = _accepted(done.out)
    assert done.out.splitlines()[0] == f"submitted {EXAMPLES / 'hello.yaml'} as incoming/{name}"
    assert name in ("hello.yaml", "hello.1.yaml")  # the daemon may not have taken the first yet
    ours = load_json(spool / "runs" / run_id / "run.json")
    assert ours["trigger"]["source"] == f"incoming/{name}"
    # The file that waited made the other run. Its inode may be ours now (freed when it was
    # taken): that run existed before our file did, so it is never taken for ours.
    (first,) = (r for r in runs_of(spool) if r["run_id"] != run_id)
    assert first["trigger"]["file_id"] == file_id(waiting)
    assert d.stop() == 0


def test_a_file_submitted_again_under_its_name_is_followed_to_its_own_run(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    """The same name, rewritten between submits: each --wait reports the run of its bytes."""
    d = daemon_factory().start()
    spec = tmp_path / "job.yaml"
    seen: set[str] = set()
    for attempt in range(2):
        for command, code, state in (("true", 0, "succeeded"), ("exit 3", 1, "failed")):
            spec.write_text(job("again", f"echo {attempt}; {command}"))
            done = chute("submit", str(spec), "--wait")
            assert done.code == code, done.out + done.err
            _, run_id = _accepted(done.out)
            assert f"run {run_id}  pipeline again  state {state}" in done.out
            assert (spool / "runs" / run_id / "spec.yaml").read_text() == spec.read_text()
            seen.add(run_id)
    assert len(seen) == 4
    assert d.stop() == 0


@pytest.mark.slow
def test_twenty_parallel_submits_of_one_name_each_follow_their_own_run(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Twenty processes submit a `job.yaml` at once, half of them failing: none replaces
    another's file in incoming/ (a name is taken again only once the daemon took the file),
    and each exits with the result of the run of its own bytes."""
    d = daemon_factory().start()
    procs: list[tuple[int, Path, subprocess.Popen[str]]] = []
    for i in range(20):
        folder = tmp_path / f"user{i}"
        folder.mkdir()
        spec = folder / "job.yaml"
        spec.write_text(job("same", f"echo {i}; exit {3 if i % 2 else 0}"))
        command = [sys.executable, "-m", "chute", "submit", str(spec), "--wait", "-q"]
        proc = subprocess.Popen(
            [*command, "--spool", str(spool)],
            env=chute_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((i, spec, proc))
    run_ids: set[str] = set()
    try:
        for i, spec, proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == (1 if i % 2 else 0), (i, out, err)
            _, run_id = _accepted(out)
            assert (spool / "runs" / run_id / "spec.yaml").read_text() == spec.read_text(), i
            state = "failed" if i % 2 else "succeeded"
            assert f"run {run_id}  pipeline same  state {state}" in out, (i, out)
            run_ids.add(run_id)
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert len(run_ids) == 20
    assert len(runs_of(spool)) == 20  # no file was lost under another's name
    assert d.stop() == 0


def test_a_rejected_submit_is_reported_to_the_caller_whose_file_it_was(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    """The daemon refuses every file (nobody is a submitter): each caller is told of the
    rejection of its own file, not of an older one under the same name."""
    d = daemon_factory("submitters: {users: [no-such-user]}\n").start()
    spec = tmp_path / "job.yaml"
    spec.write_text(job("refused", "true"))
    for report in ("job.yaml.error.json", "job.yaml.1.error.json"):
        done = chute("submit", str(spec))
        assert done.code == 1, done.out + done.err
        assert done.err.startswith("incoming/job.yaml rejected: not_submitter: is owned by ")
        assert done.err.endswith(f"({spool / 'rejected' / report})\n")
        doc = load_json(spool / "rejected" / report)
        assert doc["file_id"] == file_id(
            os.lstat(spool / "rejected" / report[: -len(".error.json")])
        )
    assert d.stop() == 0


def test_a_submitted_schedule_is_reported_as_scheduled(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute, tmp_path: Path
) -> None:
    d = daemon_factory().start()
    spec = tmp_path / "tick.yaml"
    spec.write_text(job("tick", "true", "  schedule: {every: 1h}\n"))
    done = chute("submit", str(spec))
    assert (done.code, done.out) == (
        0,
        f"submitted {spec} as incoming/tick.yaml\nincoming/tick.yaml scheduled as tick\n",
    ), done.err
    record = load_json(spool / "state" / "owners" / "tick.json")
    assert record["submitted_by"]["uid"] == os.getuid()
    assert record["source"] == "incoming/tick.yaml"
    assert d.stop() == 0
