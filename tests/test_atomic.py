"""Durable writes: atomic replacement, symlinks, and the group-commit writer thread."""

from __future__ import annotations

import os
import threading
from pathlib import Path

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
