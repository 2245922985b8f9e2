"""Durable writes: atomic replacement, symlinks, group commits and the writer thread."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chute.store import atomic, groupcommit, writer
from conftest import tmpfs


def test_write_bytes_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_bytes(b"old")
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_replace_symlink_swaps_the_target_without_a_gap(tmp_path: Path) -> None:
    link = tmp_path / "latest"
    atomic.replace_symlink(link, "a")
    atomic.replace_symlink(link, "b")
    assert os.readlink(link) == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_replace_symlink_goes_past_a_temp_link_a_crash_left(tmp_path: Path) -> None:
    link = tmp_path / "latest"
    os.symlink("stale", tmp_path / f".tmp-latest.{os.getpid()}")  # same pid, an earlier life
    atomic.replace_symlink(link, "a")
    assert os.readlink(link) == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_placed_file_never_replaces_one_already_there_and_keeps_its_identity(
    tmp_path: Path,
) -> None:
    (tmp_path / "job.yaml").write_bytes(b"theirs")
    tmp, fd = atomic.write_unplaced(tmp_path / "job.yaml", b"mine")
    try:
        assert tmp.name.startswith(".")  # ignored by every reader until placed
        with pytest.raises(FileExistsError):
            atomic.place(tmp, tmp_path / "job.yaml")
        assert (tmp_path / "job.yaml").read_bytes() == b"theirs"
        atomic.place(tmp, tmp_path / "job.1.yaml")
        placed = os.stat(tmp_path / "job.1.yaml")
        assert (placed.st_dev, placed.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        assert os.read(fd, 10) == b"mine"
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.1.yaml", "job.yaml"]


def test_remove_temp_leftovers_deletes_only_temps_of_writers_gone(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])  # its pid is most likely nobody's now
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / f".tmp-run.json.{dead.pid}").write_bytes(b"half")  # a crashed writer's
        (tmp_path / f".tmp-latest.{os.getpid()}").write_bytes(b"")  # an earlier life's
        (tmp_path / ".tmp-odd").write_bytes(b"")  # no pid: not ours to keep either
        (tmp_path / f".tmp-1-2-cancel.json.{live.pid}").write_bytes(b"{")  # being written
        (tmp_path / "run.json").write_bytes(b"{}")
        assert atomic.remove_temp_leftovers(tmp_path) == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            f".tmp-1-2-cancel.json.{live.pid}",
            "run.json",
        ]
    finally:
        live.kill()
        live.wait()


def test_committer_keeps_submission_order_and_last_version_wins(tmp_path: Path) -> None:
    c = writer.Committer()
    try:
        done: list[str] = []
        c.submit([(tmp_path / "a", b"1")], on_done=lambda: done.append("first"))
        c.submit(
            [(tmp_path / "a", b"2"), (tmp_path / "b", b"x")], on_done=lambda: done.append("second")
        )
        assert c.flush(timeout=10)
        assert (tmp_path / "a").read_bytes() == b"2"
        assert (tmp_path / "b").read_bytes() == b"x"
        assert done == ["first", "second"]
    finally:
        c.close()


def fill(path: Path) -> None:
    """Write until the filesystem says ENOSPC."""
    with open(path, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 16))
            f.flush()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at tmp_path/disk, holding one file `filler` that fills it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with tmpfs(disk, "size=1m"):
        fill(disk / "filler")
        yield disk


def test_committer_holds_a_batch_the_disk_has_no_room_for_and_retries_it_until_it_lands(
    full_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "RETRY_DELAY", 0.05)
    c = writer.Committer()
    try:
        landed = threading.Event()
        c.submit([(full_disk / "run.json", b"{}" * 4096)], on_done=landed.set)
        c.submit([(full_disk / "after", b"later")])
        assert not c.flush(timeout=0.3)  # ENOSPC: held, not dropped
        assert c.error is not None
        assert c.error.errno == errno.ENOSPC
        assert not (full_disk / "after").exists()
        (full_disk / "filler").unlink()
        assert c.flush(timeout=10)
        assert landed.is_set()
        assert (full_disk / "run.json").read_bytes() == b"{}" * 4096
        assert (full_disk / "after").read_bytes() == b"later"
        assert c.error is None
    finally:
        c.close()


def test_a_path_that_fails_on_its_own_is_dropped_with_its_scope_and_the_rest_lands(
    tmp_path: Path,
) -> None:
    """A run folder removed, a folder where a manifest goes: that run's problem, reported,
    and no other file waits for it. Within the broken run, a file after the failed one (the
    run.json that would acknowledge it) is not put in place either."""
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    (tmp_path / "a" / "manifest.json").mkdir()  # a task made it a folder
    reported: list[list[groupcommit.Unwritten]] = []
    seen: list[dict[object, groupcommit.Unwritten]] = []
    c = writer.Committer(scope=lambda p: p.parent.name, on_unwritten=reported.append)
    try:
        c.submit(
            [
                (tmp_path / "a" / "early.json", b"1"),
                (tmp_path / "a" / "manifest.json", b"2"),
                (tmp_path / "b" / "manifest.json", b"3"),
                (tmp_path / "a" / "run.json", b"4"),
                (tmp_path / "gone" / "run.json", b"5"),
                (tmp_path / "b" / "run.json", b"6"),
            ],
            on_done=lambda: seen.append(dict(c.unwritten_scopes)),
        )
        assert c.flush(timeout=10)
        assert c.error is None
    finally:
        c.close()
    assert (tmp_path / "a" / "early.json").read_bytes() == b"1"  # before the failure: landed
    assert not (tmp_path / "a" / "run.json").exists()
    assert [(tmp_path / "b" / n).read_bytes() for n in ("manifest.json", "run.json")] == [
        b"3",
        b"6",
    ]
    [unwritten] = reported
    got = {(str(u.path.relative_to(tmp_path)), u.error.errno, u.cause.name) for u in unwritten}
    assert got == {
        ("a/manifest.json", errno.EISDIR, "manifest.json"),
        ("a/run.json", errno.EISDIR, "manifest.json"),
        ("gone/run.json", errno.ENOENT, "run.json"),
    }
    [scopes] = seen
    assert {k: str(u.path.relative_to(tmp_path)) for k, u in scopes.items()} == {
        "a": "a/manifest.json",
        "gone": "gone/run.json",
    }
    assert list(tmp_path.rglob(f"{atomic.TMP_PREFIX}*")) == []


def test_a_temp_name_a_task_made_a_fifo_or_a_link_neither_blocks_nor_redirects_a_write(
    tmp_path: Path,
) -> None:
    target = tmp_path / "outside"
    target.write_bytes(b"keep")
    fifo = tmp_path / f"{atomic.TMP_PREFIX}a.json.{os.getpid()}"
    os.mkfifo(fifo)
    (tmp_path / f"{atomic.TMP_PREFIX}b.json.{os.getpid()}").symlink_to(target)
    atomic.write_volatile(tmp_path / "a.json", b"A")
    atomic.write_bytes(tmp_path / "b.json", b"B")
    assert (tmp_path / "a.json").read_bytes() == b"A"
    assert (tmp_path / "b.json").read_bytes() == b"B"
    assert target.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "outside"]


def test_close_gives_up_after_its_timeout_while_the_disk_stays_full(
    full_disk: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(writer, "RETRY_DELAY", 0.05)
    c = writer.Committer()
    done = threading.Event()
    c.submit([(full_disk / "run.json", b"{}" * 4096)], on_done=done.set)
    t0 = time.monotonic()
    assert c.close(timeout=0.5) is False
    assert time.monotonic() - t0 < 5
    assert not done.is_set()  # its owner was not told it landed: it did not
    assert not (full_disk / "run.json").exists()
    assert (
        f"exiting with 1 file(s) not written (No space left on device): {full_disk}/run.json"
        in (caplog.text)
    )


def test_committer_on_a_filesystem_of_its_own_keeps_order_too(tmp_path: Path) -> None:
    c = writer.Committer(syncfs=[tmp_path])
    try:
        done: list[str] = []
        atomic.write_volatile(tmp_path / "mark", b"m")
        c.submit([(tmp_path / "a", b"1")], on_done=lambda: done.append("first"))
        c.submit(
            [(tmp_path / "a", b"2"), (tmp_path / "b", b"x")],
            synced=[tmp_path / "mark"],
            on_done=lambda: done.append("second"),
        )
        assert c.flush(timeout=10)
        assert [(tmp_path / n).read_bytes() for n in ("a", "b", "mark")] == [b"2", b"x", b"m"]
        assert done == ["first", "second"]
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(atomic.TMP_PREFIX)]
        c.use_syncfs([])  # a config reload: fsync per file from the next batch on
        c.submit([(tmp_path / "c", b"3")])
        assert c.flush(timeout=10)
        assert (tmp_path / "c").read_bytes() == b"3"
    finally:
        c.close()


BATCH = """
import sys
from pathlib import Path
from chute.store import writer
root = Path(sys.argv[1])
c = writer.Committer(syncfs=[root] if sys.argv[2] == "syncfs" else [])
c.submit([(root / f"f{i}", b"x" * 100) for i in range(50)], folders=[root])
c.close()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci/run installs it)")
@pytest.mark.parametrize(("mode", "syncfs", "fsyncs"), [("syncfs", 2, 0), ("fsync", 0, 51)])
def test_a_batch_costs_two_syncfs_on_its_own_filesystem_else_an_fsync_per_file(
    tmp_path: Path, mode: str, syncfs: int, fsyncs: int
) -> None:
    """The system calls a group commit of 50 files makes, counted by strace."""
    root = tmp_path / "spool"
    root.mkdir()
    trace = tmp_path / "trace"
    env = {**os.environ, "PYTHONPATH": str(Path(atomic.__file__).parents[2])}
    strace = ["strace", "-f", "-qq", "-e", "trace=syncfs,fsync", "-o", str(trace)]
    subprocess.run(
        [*strace, sys.executable, "-c", BATCH, str(root), mode],
        check=True,
        env=env,
        timeout=60,
    )
    calls = [line.split()[1].split("(")[0] for line in trace.read_text().splitlines()]
    assert (calls.count("syncfs"), calls.count("fsync")) == (syncfs, fsyncs)
    assert sorted(p.name for p in root.iterdir()) == sorted(f"f{i}" for i in range(50))


def test_own_filesystems_syncs_whole_only_what_is_a_filesystem_of_its_own(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    assert groupcommit.own_filesystems("fsync", [Path("/")]) == []
    assert groupcommit.own_filesystems("auto", [tmp_path, runs]) == []  # not a mount point
    assert groupcommit.own_filesystems("syncfs", [tmp_path, runs]) == [tmp_path]  # one filesystem
    assert groupcommit.own_filesystems("auto", [Path("/")]) == [Path("/")]
