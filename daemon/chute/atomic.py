"""Durable writes: the only code that opens state files for writing.

Owns: write-to-temp, fsync, rename, fsync-the-folder; atomic symlink replacement;
group commit of many files at once.
Crash safety: a reader sees the old file or the new one, never a mix; after `write_*`
returns, the new name survives power loss (its folder was fsynced). A temp leftover
from a crash starts with `.tmp-` and is ignored by every reader.
Diagnostics: OSError propagates to the caller, which knows the handover that failed.
Limits: a failed fsync is not retried on the same file (fsyncgate): the caller redoes it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import orjson

TMP_PREFIX = ".tmp-"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(path: Path, data: bytes, mode: int) -> Path:
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically and durably replace `path` with `data`."""
    write_many([(path, data)], mode)


def write_json(path: Path, obj: object) -> None:
    write_bytes(path, dumps(obj))


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


def write_many(
    files: Iterable[tuple[Path, bytes]], mode: int = 0o644, folders: Iterable[Path] = ()
) -> None:
    """Group commit: write and fsync every temp, rename them all in order, then fsync each
    folder once (those of the files, and `folders`: ones that gained a new subfolder).

    Each file is atomic on its own; the batch is not (a crash may leave some renamed), so
    callers list the file that acknowledges the others last.
    """
    staged = [(_write_tmp(path, data, mode), path) for path, data in files]
    to_sync = set(folders)
    for tmp, path in staged:
        os.rename(tmp, path)
        to_sync.add(path.parent)
    for folder in sorted(to_sync, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically: create a temp symlink, rename it over the old one."""
    tmp = _tmp_name(link)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.rename(tmp, link)
    fsync_dir(link.parent)


def remove_temp_leftovers(folder: Path) -> int:
    """Delete `.tmp-*` files a crash left in `folder`; returns how many."""
    count = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX):
            try:
                os.unlink(entry.path)
                count += 1
            except FileNotFoundError:
                pass
    return count
