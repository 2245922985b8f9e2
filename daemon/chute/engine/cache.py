"""The stage cache: cache/<key>/output.json, keyed by what a stage's result depends on.

Owns: cache/ and the cache key. Not here: when the cache is consulted (chute.engine.loop),
removing old entries (chute.retention, which sees an entry as a folder cache/<key>/ whose
mtime says when it was last stored or used: `touch`).
Crash safety: an entry is one file written atomically; a torn entry cannot exist.
Diagnostics: an entry that cannot be read is the caller's to report (a miss, with a warning).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import orjson

from chute import taskfiles
from chute.spec.model import Stage

ENTRY_LIMIT = 256 << 20  # bytes: an output (1 MiB at most) and the listing of its artifacts


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


def entry_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key / "output.json"


def lookup(cache_dir: Path, key: str) -> bytes | None:
    """The entry's output.json, or None when there is none. Read as a task's file
    (chute.taskfiles: a task reaches cache/ through its run folder's parents): OSError when
    what is there is not a regular file of at most ENTRY_LIMIT bytes, or cannot be read."""
    try:
        return taskfiles.read_regular(str(entry_path(cache_dir, key)), ENTRY_LIMIT)
    except FileNotFoundError:
        return None


def touch(cache_dir: Path, key: str) -> None:
    """Mark the entry used now (its folder's mtime): retention (chute.retention) removes the
    least recently used first, and never one used within its grace. No entry: nothing."""
    with contextlib.suppress(OSError):
        os.utime(cache_dir / key, follow_symlinks=False)
