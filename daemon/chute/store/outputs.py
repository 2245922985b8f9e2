"""A stage's output.json: what it holds, the hash of its data, the listing of its artifacts.

Owns: the output.json document (`_meta`, `data`, `artifacts`: docs/spool.md), the data
hash, moving an output's paths to the run that uses it (relocate), and the walk of an
artifacts folder, a task's own and so hostile input: no artifact
may link out of the run or be a FIFO, socket or device, and a folder that cannot be listed
fails the attempt rather than anything else. Used by the engine, and by a call: worker
that writes its own task's output.json (Task.mark) so the engine's loop creates no file
for it. Not here: when the file is
written and made durable (chute.engine.loop), its schema (schemas/output.schema.json).
"""

from __future__ import annotations

import errno
import hashlib
import mimetypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from chute.clock import rfc3339
from chute.store import taskfiles
from chute.store.atomic import dumps


def digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def data_hash(data: Any) -> str:
    """The `output_hash` of a stage's data: sha256 of its JSON with sorted keys."""
    return digest(orjson.dumps(data, option=orjson.OPT_SORT_KEYS))


def stored_hash(doc: dict[str, Any]) -> str | None:
    """The output_hash an output.json document records (`_meta`), None if it has none."""
    meta = doc.get("_meta")
    value = meta.get("output_hash") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def document(
    *,
    stage: str,
    version: str,
    created_at: float,
    started_at: float | None,
    input_hash: str | None,
    data: Any,
    artifacts: list[dict[str, str]],
    output_hash: str | None = None,
) -> bytes:
    """output.json for a stage (or one shard) created at `created_at` (epoch seconds)."""
    return dumps(
        {
            "_meta": {
                "stage": stage,
                "version": version,
                "created_at": rfc3339(created_at),
                "duration_seconds": None
                if started_at is None
                else round(created_at - started_at, 6),
                "input_hash": input_hash,
                "output_hash": output_hash or data_hash(data),
            },
            "data": data,
            "artifacts": artifacts,
        }
    )


def relocate(data: Any, origins: Sequence[str], run_dir: str) -> Any:
    """`data` with each path inside a run folder that made it (`origins`: the spellings of
    that folder, as its tasks saw it and its real path) made the same path inside `run_dir`,
    the run that uses it (a cache hit, a retry's kept stage): in every string and key, where
    a spelling is followed by `/` or ends the string. So an output names files of the run
    that uses it, never of another run, which retention may remove. Whatever names no such
    path is returned as it is."""
    spellings = [o for o in origins if o and o != run_dir]
    if not spellings:
        return data

    def text(s: str) -> str:
        for old in spellings:
            if old in s:
                s = s.replace(old + "/", run_dir + "/")
                if s.endswith(old):
                    s = s[: -len(old)] + run_dir
        return s

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return text(value)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {text(k) if isinstance(k, str) else k: walk(v) for k, v in value.items()}
        return value

    return walk(data)


def scan_artifacts(
    folder: Path, stage_folder: Path, run_dir: Path
) -> tuple[list[dict[str, str]], str | None]:
    """One pass over a task's artifacts: the listing for output.json (paths relative to the
    stage folder) and, if the attempt must fail, why.

    The folder is the task's, so anything may be there. Artifacts are files (and folders of
    them) the run owns: a link that points outside the run would let whatever reads, copies
    or serves a run's artifacts reach the rest of the machine; a FIFO, socket or device
    is not a result and blocks or breaks whatever reads or copies it. The folder itself is
    opened without following a link (and never blocks); one that is not a folder, or cannot
    be listed, fails the attempt too. A missing folder is no artifacts.
    """
    listing: list[dict[str, str]] = []
    root = ""
    pending = [""]  # folders to list, relative to `folder`
    while pending:
        rel_dir = pending.pop()
        path = os.path.join(folder, rel_dir) if rel_dir else str(folder)
        try:
            fd = os.open(path, _LIST_FLAGS)
        except FileNotFoundError:
            continue  # none made, or removed by the task: nothing to list
        except OSError as exc:
            return listing, _unlistable(folder, rel_dir, exc)
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=True)
            for e in entries:
                rel = os.path.join(rel_dir, e.name) if rel_dir else e.name
                if e.is_symlink():
                    root = root or os.path.realpath(run_dir)
                    full = os.path.join(folder, rel)
                    if os.path.commonpath([root, os.path.realpath(full)]) != root:
                        return listing, (
                            f"artifact {_short(rel)!r} links outside the run folder (to "
                            f"{_link_target(full)}); write the file into $CHUTE_ARTIFACTS "
                            "instead of linking to it"
                        )
                elif e.is_dir(follow_symlinks=False):
                    pending.append(rel)
                    continue
                elif not e.is_file(follow_symlinks=False):
                    what = taskfiles.kind(e.stat(follow_symlinks=False).st_mode)
                    return listing, (
                        f"artifact {_short(rel)!r} is {what}, not a file or folder; artifacts "
                        "are files: remove it (or put a regular file in its place) before the "
                        "task ends"
                    )
                kind = mimetypes.guess_type(e.name)[0] or "application/octet-stream"
                listing.append(
                    {
                        "name": e.name,
                        "path": os.path.relpath(os.path.join(folder, rel), stage_folder),
                        "type": kind,
                    }
                )
        except OSError as exc:
            return listing, _unlistable(folder, rel_dir, exc)
        finally:
            os.close(fd)
    listing.sort(key=lambda a: a["path"])
    return listing, None


# A folder to list: never through a link (ELOOP), never a FIFO or file (ENOTDIR), no wait.
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _unlistable(folder: Path, rel_dir: str, exc: OSError) -> str:
    """Why the artifacts (sub)folder `rel_dir` cannot be listed, for the attempt's error."""
    if rel_dir:
        return f"cannot list artifact folder {_short(rel_dir)!r}: {exc.strerror}"
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            what = taskfiles.kind(os.lstat(folder).st_mode)
        except OSError:
            what = "not a folder"
        return (
            f"$CHUTE_ARTIFACTS {folder} is {what}, not a folder; leave it a folder and write "
            "the artifacts into it"
        )
    return f"cannot list $CHUTE_ARTIFACTS {folder}: {exc.strerror}"


def _short(rel: str, limit: int = 120) -> str:
    """A relative path for a message: a task can nest folders thousands of bytes deep."""
    return rel if len(rel) <= limit else f"{rel[: limit // 2]}...{rel[-limit // 2 :]}"


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError as exc:
        return f"? ({exc.strerror})"
