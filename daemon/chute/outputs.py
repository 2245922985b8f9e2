"""A stage's output.json: what it holds, the hash of its data, the listing of its artifacts.

Owns: the document DESIGN.md gives output.json (`_meta`, `data`, `artifacts`), the data
hash, and the walk of an artifacts folder with its check that no artifact links out of the
run. Used by the engine, and by a call: worker that writes its own task's output.json
(Task.mark) so the engine's loop creates no file for it. Not here: when the file is
written and made durable (chute.engine.loop), its schema (schemas/output.schema.json).
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from pathlib import Path
from typing import Any

import orjson

from chute.atomic import dumps
from chute.clock import rfc3339


def digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def data_hash(data: Any) -> str:
    """The `output_hash` of a stage's data: sha256 of its JSON with sorted keys."""
    return digest(orjson.dumps(data, option=orjson.OPT_SORT_KEYS))


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


def scan_artifacts(
    folder: Path, stage_folder: Path, run_dir: Path
) -> tuple[list[dict[str, str]], str | None]:
    """One pass over a task's artifacts: the listing for output.json (paths relative to the
    stage folder) and, if any, the error for the first link that points outside the run.

    Artifacts are files the run owns; a link out (`../../etc/passwd`) would let whatever
    reads, copies or serves a run's artifacts reach the rest of the machine.
    """
    listing: list[dict[str, str]] = []
    root = ""
    pending = [str(folder)]
    while pending:
        try:
            entries = sorted(os.scandir(pending.pop()), key=lambda e: e.name, reverse=True)
        except FileNotFoundError:
            continue
        for e in entries:
            if e.is_symlink():
                root = root or os.path.realpath(run_dir)
                target = os.path.realpath(e.path)
                if os.path.commonpath([root, target]) != root:
                    rel = os.path.relpath(e.path, folder)
                    return listing, (
                        f"artifact {rel!r} links outside the run folder (to "
                        f"{os.readlink(e.path)}); write the file into $CHUTE_ARTIFACTS "
                        "instead of linking to it"
                    )
            if e.is_dir(follow_symlinks=False):
                pending.append(e.path)
                continue
            kind = mimetypes.guess_type(e.name)[0] or "application/octet-stream"
            listing.append(
                {"name": e.name, "path": os.path.relpath(e.path, stage_folder), "type": kind}
            )
    listing.sort(key=lambda a: a["path"])
    return listing, None
