"""The stage cache: cache/<key>/output.json, keyed by what a stage's result depends on.

Owns: cache/ and the cache key. Not here: when the cache is consulted (chute.engine.loop).
Crash safety: an entry is one file written atomically; a torn entry cannot exist.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import orjson

from chute.spec.model import Stage


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
    try:
        return entry_path(cache_dir, key).read_bytes()
    except FileNotFoundError:
        return None
