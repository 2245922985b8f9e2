"""Durable writes: atomic replacement, symlinks, and the group-commit writer thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chute import atomic


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


def test_remove_temp_leftovers_deletes_only_temps(tmp_path: Path) -> None:
    (tmp_path / ".tmp-run.json.123").write_bytes(b"half")
    (tmp_path / "run.json").write_bytes(b"{}")
    assert atomic.remove_temp_leftovers(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_committer_keeps_submission_order_and_last_version_wins(tmp_path: Path) -> None:
    c = atomic.Committer()
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


def test_committer_holds_a_failed_batch_and_retries_it_until_it_lands(
    tmp_path: Path, monkeypatch: object
) -> None:
    atomic_retry = 0.05
    import pytest

    mp = pytest.MonkeyPatch()
    mp.setattr(atomic, "RETRY_DELAY", atomic_retry)
    c = atomic.Committer()
    try:
        missing = tmp_path / "not-yet"
        landed = threading.Event()
        c.submit([(missing / "run.json", b"{}")], on_done=landed.set)
        c.submit([(tmp_path / "after", b"later")])
        assert not c.flush(timeout=0.3)  # ENOENT: held, not dropped
        assert c.error is not None
        assert not (tmp_path / "after").exists()
        missing.mkdir()
        assert c.flush(timeout=10)
        assert landed.is_set()
        assert (missing / "run.json").read_bytes() == b"{}"
        assert (tmp_path / "after").read_bytes() == b"later"
        assert c.error is None
    finally:
        c.close()
        mp.undo()


def test_committer_on_a_filesystem_of_its_own_keeps_order_too(tmp_path: Path) -> None:
    c = atomic.Committer(syncfs=[tmp_path])
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
from chute import atomic
root = Path(sys.argv[1])
c = atomic.Committer(syncfs=[root] if sys.argv[2] == "syncfs" else [])
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
    env = {**os.environ, "PYTHONPATH": str(Path(atomic.__file__).parents[1])}
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
    assert atomic.own_filesystems("fsync", [Path("/")]) == []
    assert atomic.own_filesystems("auto", [tmp_path, runs]) == []  # not a mount point
    assert atomic.own_filesystems("syncfs", [tmp_path, runs]) == [tmp_path]  # one filesystem
    assert atomic.own_filesystems("auto", [Path("/")]) == [Path("/")]
