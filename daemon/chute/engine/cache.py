"""The stage cache: cache/<key>/, keyed by what a stage's result depends on, owning its files.

Owns: cache/, the cache key, and what an entry holds, so that no entry needs the run that
made it (retention may remove that run):
  cache/<key>/entry.json    {"origin": {"run_dir": that run's folder as its tasks saw it,
                            "real_run_dir": its real path}, "output": the stage's output.json}
  cache/<key>/files/<path>  each artifact the output lists (<path> relative to the stage
                            folder), hard-linked from that run (copied across filesystems;
                            an artifact that was a link inside the run: what it pointed to)
The files are shared by hard link with the run that made them and every run that used them,
so they are made read-only: a task that wants to change an artifact it was given writes a
new file. Not here: when the cache is consulted and kept, and the group commit that makes an
entry durable (chute.engine.results); rewriting the data's paths (chute.store.outputs.relocate).
Crash safety: entry.json is the entry's commit point, one file written atomically after its
files are in place (their names and contents synced in the same group commit, before it):
without it there is no entry, with it the entry is whole, and it pairs an output with the
folder its paths name, so a reader never mixes two. A new entry of a key is built in place
over whatever is there (an earlier chute's cache/<key>/output.json, with no files of its
own, is ignored; a file or link a task put where a folder goes is removed, never followed):
the files it relinks belong to the same key, so an old entry.json still finds its own.
Diagnostics: an entry that cannot be used (unreadable, or a file it lists is gone) raises
Unusable, whose text says why: the caller warns and runs the stage (a miss, never a
failure). An entry that cannot be kept is one WARNING line; the run goes on.
Limits: root ignores the read-only mode: a task run as root can still change a cached file
in place, for every run that shares it. Removing old entries is chute.store.retention's, which sees
an entry as a folder cache/<key>/ whose mtime says when it was last stored or used (`touch`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from chute.spec.model import Stage
from chute.store import atomic, taskfiles
from chute.store.outputs import stored_hash

log = logging.getLogger(__name__)

ENTRY_NAME = "entry.json"
ENTRY_LIMIT = 256 << 20  # bytes: an output (1 MiB at most) and the listing of its artifacts


class Unusable(Exception):
    """A cache entry that cannot be used (a miss): str() says why, for one warning line."""


def cache_key(stage: Stage, upstream_hashes: Mapping[str, str]) -> str:
    """sha256 of stage name, version, run/call, with, the inputs' output hashes and env."""
    material = {
        "name": stage.name,
        "version": stage.version,
        "run": stage.run,
        "call": stage.call,
        "with": dict(stage.with_),
        "inputs": dict(stage.inputs),
        "shards": None
        if stage.shards is None
        else [stage.shards.count, list(stage.shards.items or [])],
        "upstream": dict(sorted(upstream_hashes.items())),
        "env": dict(sorted(stage.env.items())),
    }
    blob = orjson.dumps(material, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    """A whole cache entry, checked: its output document, the spellings of the folder of
    the run that made it (to rewrite paths from), and its files by artifact path."""

    folder: Path
    doc: dict[str, Any]
    origins: tuple[str, ...]
    files: tuple[str, ...]  # artifact paths, relative to the stage folder and to files/

    @property
    def output_hash(self) -> str | None:
        return stored_hash(self.doc)


def lookup(cache_dir: Path, key: str) -> Entry | None:
    """The entry of `key`, None when there is none; Unusable when what is there cannot be
    used. Read as a task's files (chute.store.taskfiles: a task reaches cache/ through its run
    folder's parents): never through a link, never blocking, within bounds."""
    folder = cache_dir / key
    try:
        record = orjson.loads(taskfiles.read_regular(str(folder / ENTRY_NAME), ENTRY_LIMIT))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unusable(f"is unreadable ({exc.strerror})") from None
    except orjson.JSONDecodeError:
        raise Unusable("is unreadable (not JSON)") from None
    origin = record.get("origin") if isinstance(record, dict) else None
    doc = record.get("output") if isinstance(record, dict) else None
    origins = (
        [origin.get("run_dir"), origin.get("real_run_dir")] if isinstance(origin, dict) else []
    )
    if not isinstance(doc, dict) or "data" not in doc or not origins or not origins[0]:
        raise Unusable("is unreadable (not an entry chute wrote)")
    files = tuple(_artifact_paths(doc))
    for path in files:
        try:
            mode = os.lstat(folder / "files" / path).st_mode
        except OSError as exc:
            raise Unusable(f"lacks its file {path} ({exc.strerror})") from None
        if not stat.S_ISREG(mode):
            raise Unusable(f"lacks its file {path} (it is {taskfiles.kind(mode)})")
    spellings = tuple(dict.fromkeys(o for o in origins if isinstance(o, str) and o))
    return Entry(folder, doc, spellings, files)


def _artifact_paths(doc: dict[str, Any]) -> list[str]:
    """The artifact paths an output document lists; Unusable for one that would lead out of
    the folder it is relative to (an entry a task wrote)."""
    out: list[str] = []
    listing = doc.get("artifacts") or []
    if not isinstance(listing, list):
        raise Unusable("is unreadable (its artifacts are not a list)")
    for item in listing:
        path = item.get("path") if isinstance(item, dict) else None
        if not isinstance(path, str) or any(p in ("", ".", "..") for p in path.split("/")):
            raise Unusable(f"is unreadable (artifact path {path!r})")
        out.append(path)
    return out


def place(entry: Entry, stage_folder: Path) -> set[Path]:
    """Put the entry's files at their paths under `stage_folder` (a stage of the run that
    hit), each a hard link (a copy across filesystems); what was at such a path is replaced.
    Returns the folders that gained names (to sync). OSError: not all could be placed; the
    ones placed are removed again, so the stage can run in a clean folder."""
    placed: list[Path] = []
    touched: set[Path] = set()
    try:
        for path in entry.files:
            dest = stage_folder / path
            for parent in reversed(dest.relative_to(stage_folder).parents[:-1]):
                folder = stage_folder / parent
                try:
                    os.mkdir(folder)
                    touched.add(folder.parent)
                except FileExistsError:
                    pass
            _replace_with_link(str(entry.folder / "files" / path), dest)
            placed.append(dest)
            touched.add(dest.parent)
    except OSError:
        for dest in placed:
            try:
                os.unlink(dest)
            except OSError as exc:
                log.debug("%s: %s", dest, exc.strerror)
        raise
    return touched


@dataclass(slots=True)
class Kept:
    """An entry with its files in place: what the caller's group commit must make durable,
    `write` (entry.json, the entry's commit point) after the files."""

    write: tuple[Path, bytes]
    links: list[Path] = field(default_factory=list)  # new names of files, to fsync
    folders: set[Path] = field(default_factory=set)  # folders that gained names


def keep(cache_dir: Path, key: str, blob: bytes, stage_folder: Path, run_dir: Path) -> Kept:
    """The entry of `key` from a stage that just succeeded (`blob` its output.json,
    `stage_folder` its folder in `run_dir`): its files linked into cache/<key>/files/ and
    made read-only; entry.json is the caller's to write. OSError when it cannot be kept
    (an artifact gone or replaced since it was listed, no room): nothing points at what was
    linked, and the next entry of `key` replaces it."""
    doc = orjson.loads(blob)
    try:
        paths = _artifact_paths(doc)
    except Unusable as exc:
        raise OSError(errno.EINVAL, f"its output.json {exc}") from None
    folder = cache_dir / key
    files = folder / "files"
    kept = Kept(write=(folder / ENTRY_NAME, b""))
    for made in (cache_dir, folder, files):
        if _folder(made):
            kept.folders.add(made.parent)
    real_run = os.path.realpath(run_dir)
    for path in paths:
        dest = files / path
        for parent in reversed(Path(path).parents[:-1]):
            if _folder(files / parent):
                kept.folders.add((files / parent).parent)
        source = str(stage_folder / path)
        if stat.S_ISLNK(os.lstat(source).st_mode):
            # A link inside the run (outputs.scan_artifacts let no other through): the
            # entry keeps what it points to, which retention may remove with the run.
            source = os.path.realpath(source)
            if os.path.commonpath([real_run, source]) != real_run:
                raise OSError(errno.EXDEV, "links out of its run folder", path)
        _replace_with_link(source, dest)
        os.chmod(dest, stat.S_IMODE(os.lstat(dest).st_mode) & ~0o222)
        kept.links.append(dest)
    origin = {"run_dir": str(run_dir), "real_run_dir": real_run}
    kept.write = (folder / ENTRY_NAME, atomic.dumps({"origin": origin, "output": doc}))
    return kept


def _folder(path: Path) -> bool:
    """Make `path` a folder of ours; True when it was made. Anything else found there (a
    file, a FIFO, a link a task put in its place) is removed first: it is never followed."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return False
    os.unlink(path)
    os.mkdir(path)
    return True


def _replace_with_link(source: str, dest: Path) -> None:
    """Make `dest` the regular file `source` is, by a hard link (a copy across filesystems
    or where links are refused), replacing what is at `dest`. `source` is not followed if it
    is a link, and what lands at `dest` must be a regular file (OSError otherwise)."""
    try:
        os.unlink(dest)
    except FileNotFoundError:
        pass
    try:
        os.link(source, dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        _copy(source, dest)
    mode = os.lstat(dest).st_mode
    if not stat.S_ISREG(mode):  # swapped for a link or a FIFO since it was checked
        os.unlink(dest)
        raise OSError(errno.EINVAL, f"is {taskfiles.kind(mode)}, not a regular file", source)


def _copy(source: str, dest: Path) -> None:
    src = taskfiles.open_regular(source, os.O_RDONLY)
    try:
        st = os.fstat(src)
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, st.st_mode & 0o777)
        try:
            offset = 0
            while sent := os.sendfile(out, src, offset, 1 << 24):
                offset += sent
        finally:
            os.close(out)
    finally:
        os.close(src)


def touch(cache_dir: Path, key: str) -> None:
    """Mark the entry used now (its folder's mtime): retention (chute.store.retention) removes the
    least recently used first, and never one used within its grace. No entry: nothing."""
    with contextlib.suppress(OSError):
        os.utime(cache_dir / key, follow_symlinks=False)
