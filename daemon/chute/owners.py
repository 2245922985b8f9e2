"""Who submitted what the daemon holds.

Owns: state/owners/<schedule>.json, the record of who submitted each schedule and from which
dropped file ({schedule, submitted_by: {uid, user}, source, file, accepted_at}). A run keeps
the same facts in its run.json (submitted_by, trigger.source, trigger.file). Not here:
writing schedules/ (chute.intake, which writes the record first), reading requests
(chute.control).
Why a record of its own: schedules/<name>.yaml is the daemon's copy of the bytes, owned by
the daemon's user, so neither its owner nor its content says who dropped it.
Crash safety: intake writes the record (atomically) before schedules/<name>.yaml and both
before it unlinks the claim, so a crash in between redoes both from the claim. A record
without its schedule file (unscheduled by deleting the file) is stale and harmless: the
next schedule of that name writes its own first.
Diagnostics: a missing or unreadable record reads as None (no known submitter).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import orjson

from chute import atomic
from chute.spool import Spool

FOLDER = "owners"


def schedule_record_path(spool: Spool, name: str) -> Path:
    """state/owners/<name>.json; `name` is a schedule name (chute.names checked it)."""
    return spool.state / FOLDER / f"{name}.json"


def record_schedule(spool: Spool, name: str, record: dict[str, Any]) -> None:
    """Write the record of schedule `name`, durably (before its schedules/ file)."""
    path = schedule_record_path(spool, name)
    try:
        atomic.write_json(path, record)
    except FileNotFoundError:  # the first schedule of this spool
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, record)


def schedule_record(spool: Spool, name: str) -> dict[str, Any] | None:
    """The record of schedule `name`, or None when there is none (or it cannot be read)."""
    try:
        doc = orjson.loads(schedule_record_path(spool, name).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def forget_schedule(spool: Spool, name: str) -> None:
    """Remove the record of a schedule whose file is gone (not synced: a record back after a
    power loss is stale, see the module's crash safety)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(schedule_record_path(spool, name))
