"""Spec files: read a Job or Pipeline safely, validate it with errors that teach, describe it.

Owns: the public API the engine and the CLI use — load_file, load_bytes, json_schema, SpecError,
Issue. Not here: reading YAML safely (chute.spec.load), single fields and the JSON Schema
(chute.spec.fields, made of chute.spec.types), rules across fields and the merge
(chute.spec.validate), the validated shape (chute.spec.model), durations and sizes
(chute.units).
Crash safety: reads only; load_file returns the exact bytes it validated, so the caller can
keep them as the run's spec.yaml (spec_sha256 is their hash) without reading the file again.
Diagnostics: a user's mistake is a SpecError listing every Issue, sorted by line; str(issue)
is the line `chute validate` prints. Nothing here logs.
Limits: hostile input (alias bombs, deep nesting, huge or special files) is refused before
it is expanded, composed or read; see chute.spec.load.
"""

from __future__ import annotations

from pathlib import Path

from chute.spec.fields import json_schema
from chute.spec.load import Issue, SpecError, parse, read_file
from chute.spec.model import Pipeline
from chute.spec.validate import validate

__all__ = ["Issue", "SpecError", "json_schema", "load_bytes", "load_file"]


def load_file(
    path: str | Path,
    *,
    max_file_size: int = 1 << 20,
    node_cpus: int | None = None,
    node_memory: int | None = None,
    display_name: str | None = None,
) -> tuple[Pipeline, bytes]:
    """The validated spec in `path` and the exact bytes read; SpecError otherwise.

    Issues name the file `display_name`, else `path` as given. A symlink, FIFO, directory or
    device, or a file over `max_file_size` bytes, is refused without reading it.
    """
    name = display_name if display_name is not None else str(path)
    data = read_file(path, max_file_size=max_file_size, display_name=name)
    return load_bytes(data, name, node_cpus=node_cpus, node_memory=node_memory), data


def load_bytes(
    data: bytes,
    name: str,
    *,
    node_cpus: int | None = None,
    node_memory: int | None = None,
) -> Pipeline:
    """The validated spec in `data` (named `name` in issues); SpecError otherwise.

    `node_cpus` / `node_memory` (bytes), when given, refuse stages that ask for more.
    """
    root, issues = parse(data, name)
    return validate(root, name, issues, node_cpus=node_cpus, node_memory=node_memory)
