"""Scenario 2: the spool's disk fills up while files keep arriving.

Pass: the daemon stays up, says so (an ERROR line, /healthz 503 with the reason, a metric),
loses no file, and catches up once space returns: every file dropped ends in exactly one
successful run. A SIGTERM while writes fail still ends the daemon in bounded time, and
what it could not write is redone at the next start.

And its counterpart: an error about one run's folder (the folder removed, a folder where
its manifest goes) is that run's problem, not the disk's: the run fails (or is dropped, if
nothing of it can be written), and every other run goes on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from conftest import load_json, tmpfs, wait_for
from daemon_proc import Daemon, daemon_factory, drop, final_run, healthz, job, runs_of

__all__ = ["daemon_factory"]


@pytest.fixture
def small_spool(spool: Path) -> Iterator[Path]:
    """The spool on its own 16 MiB tmpfs, so it can be filled without touching the host."""
    with tmpfs(spool, "size=16m"):
        yield spool


def fill(path: Path) -> None:
    """Write until the filesystem says ENOSPC."""
    with open(path, "wb") as f, contextlib.suppress(OSError):
        block = b"\0" * (1 << 20)
        while True:
            f.write(block)
            f.flush()


def health(spool: Path) -> tuple[int, str]:
    try:
        status = orjson.loads((spool / "state" / "status.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return 0, "no status"
    addr = status.get("http")
    if not addr:
        return 0, "no http"
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
def test_a_full_disk_loses_nothing_and_the_daemon_catches_up(
    small_spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    spool = small_spool
    d = daemon_factory("cpus: 2\nrescan_interval: 1s\nhttp: {listen: '127.0.0.1:0'}\n").start()
    staging = spool / "staging"
    staging.mkdir()
    for i in range(20):
        (staging / f"late{i}.yaml").write_text(job(f"late{i}", "echo hello"))
    (spool / "incoming" / ".early.tmp").write_text(job("early", "true"))
    os.rename(spool / "incoming" / ".early.tmp", spool / "incoming" / "early.yaml")
    assert final_run(spool, "incoming/early.yaml")["state"] == "succeeded"

    filler = spool / "filler"
    fill(filler)
    for i in range(20):  # a rename needs no free blocks: drops keep arriving on a full disk
        os.rename(staging / f"late{i}.yaml", spool / "incoming" / f"late{i}.yaml")
    wait_for("the daemon to report the full disk", lambda: "No space left" in d.log.read_text(), 30)
    assert d.proc is not None
    assert d.proc.poll() is None
    code, _ = health(spool)
    if code:  # the HTTP endpoint is up: it must say why it is unhealthy
        wait_for("healthz to say 503", lambda: health(spool)[0] == 503, 15)
        assert "No space left" in health(spool)[1] or "ENOSPC" in health(spool)[1]
    # Nothing is lost: each late file is still in incoming/, claimed in state/intake/, or run.
    for i in range(20):
        name = f"late{i}.yaml"
        places = [
            (spool / "incoming" / name).exists(),
            any(p.name.endswith(f"__{name}") for p in (spool / "state" / "intake").iterdir()),
            bool(runs_of(spool, f"incoming/{name}")),
        ]
        assert any(places), name

    filler.unlink()
    for i in range(20):
        rec = final_run(spool, f"incoming/late{i}.yaml", timeout=60)
        assert rec["state"] == "succeeded", rec
        assert len(runs_of(spool, f"incoming/late{i}.yaml")) == 1
    if code:
        wait_for(f"healthz to recover (last: {health(spool)})", lambda: health(spool)[0] == 200, 15)
    assert d.stop() == 0


def test_a_queued_run_whose_folder_is_removed_is_dropped_and_nothing_else_waits(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    d = daemon_factory("cpus: 1\nkill_grace: 1s\n").start()
    drop(spool, "first.yaml", job("first", f"while [ ! -e {gate} ]; do sleep 0.02; done"))
    wait_for("first to run", lambda: [r["state"] for r in runs_of(spool)] == ["running"])
    drop(spool, "orphan.yaml", job("orphan", "echo never"))
    orphan = wait_for("orphan to be queued", lambda: runs_of(spool, "incoming/orphan.yaml"))[0]
    run_dir = spool / "runs" / orphan["run_id"]
    shutil.rmtree(run_dir)  # an operator (or a task) removes a queued run's folder
    gate.touch()
    assert final_run(spool, "incoming/first.yaml")["state"] == "succeeded"
    drop(spool, "after.yaml", job("after", "echo fine"))
    assert final_run(spool, "incoming/after.yaml")["state"] == "succeeded"
    queued = spool / "queue" / f"{orphan['run_id']}.yaml"
    wait_for("the orphan's queue file to go", lambda: not queued.exists())
    assert healthz(spool)[0] == 200, healthz(spool)
    assert not run_dir.exists()
    errors = [line for line in d.log.read_text().splitlines() if " ERROR " in line]
    assert errors == [
        f"{errors[0][:23]} ERROR {orphan['run_id']} dropped: cannot write "
        f"{run_dir}/manifest.json: No such file or directory; its end cannot be recorded in "
        f"{run_dir}, and it is not resumed"
    ]
    assert d.stop() == 0
    d.messages.clear()
    d.start()  # nothing comes back
    wait_for("/healthz to answer 200 after the restart", lambda: healthz(spool)[0] == 200, 30)
    assert d.stop() == 0
    assert [line for line in d.log.read_text().splitlines() if " ERROR " in line] == errors


def test_a_task_that_makes_its_manifest_a_folder_fails_its_run_only(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory("kill_grace: 1s\n").start()
    make = 'm="$CHUTE_RUN_DIR/manifest.json"; rm -rf "$m"; mkdir "$m"'
    drop(spool, "mess.yaml", job("mess", make))
    rec = final_run(spool, "incoming/mess.yaml")
    run_dir = spool / "runs" / rec["run_id"]
    assert (rec["state"], rec["error"]) == (
        "failed",
        f"cannot write {run_dir}/manifest.json: Is a directory",
    )
    wait_for(
        "its queue file to go",
        lambda: not (spool / "queue").joinpath(f"{rec['run_id']}.yaml").exists(),
    )
    drop(spool, "after.yaml", job("after", "echo fine"))
    assert final_run(spool, "incoming/after.yaml")["state"] == "succeeded"
    assert healthz(spool)[0] == 200, healthz(spool)
    log = d.log.read_text()
    assert f" WARNING {rec['run_id']} failed: {rec['error']}\n" in log
    assert " ERROR " not in log  # the run's problem, not the environment's
    assert d.stop() == 0


@pytest.mark.slow
def test_sigterm_while_writes_fail_ends_the_daemon_in_time_and_a_restart_redoes_them(
    small_spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    spool = small_spool
    marker = tmp_path / "ran-once"
    d = daemon_factory("cpus: 2\nstop_timeout: 1s\nkill_grace: 1s\n").start()
    drop(spool, "long.yaml", job("long", f"[ -e {marker} ] || {{ touch {marker}; sleep 1000; }}"))
    rec = wait_for(
        "the run to be running",
        lambda: [r for r in runs_of(spool, "incoming/long.yaml") if r["state"] == "running"],
    )[0]
    filler = spool / "filler"
    fill(filler)  # the writes the stop makes (its run left `interrupted`) find no room
    assert d.proc is not None
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    # stop_timeout, kill_grace, then at most engine.writes.CLOSE_LIMIT (5 s) for the writes.
    assert d.stop(timeout=30) == 0
    took = time.monotonic() - t0
    assert took < 15, took
    log = d.log.read_text()
    run_dir = spool / "runs" / rec["run_id"]
    assert (
        f"exiting with 2 file(s) not written (No space left on device): "
        f"{run_dir}/manifest.json, {run_dir}/run.json"
    ) in log
    assert load_json(run_dir / "run.json")["state"] == "running"  # its end is not on disk
    assert (spool / "queue" / f"{rec['run_id']}.yaml").exists()
    filler.unlink()
    d.messages.clear()
    d.start()
    done = final_run(spool, "incoming/long.yaml")
    assert (done["state"], done["recoveries"]) == ("succeeded", 1)
    assert d.stop() == 0
