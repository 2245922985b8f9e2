"""rejected/: a refused file beside its <file>.error.json, for dropped files and requests alike.

Owns: the free name a refused file gets in rejected/ (`name`, else `name.1`, `name.2`…), the
error.json document ({file, reason, errors: [{path, line, message}], rejected_at}, and the
dropped file's file_id), rejecting a claimed drop with its WARNING line, and finding the
refused files whose error.json is missing. Not here: why a file is refused
(chute.intake.inspection, chute.spec, chute.intake.control), how long rejected/ keeps files
(chute.store.retention).
Crash safety: the file is renamed into rejected/ first, and its error.json (written
atomically) completes the rejection. A crash in between leaves a refused file without one:
`unreported` finds it at the next start, and its owner writes the error.json again
(chute.intake.recovery for drops, chute.intake.control.repair for requests).
Diagnostics: a rejected drop is one WARNING line naming its first problem and how many more
its error.json holds.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from chute.clock import rfc3339
from chute.intake.filenames import file_id, fit, json_safe, show
from chute.spec import Issue
from chute.store import atomic

log = logging.getLogger(__name__)

ERROR_SUFFIX = ".error.json"


@dataclass(frozen=True, slots=True)
class Rejected:
    """Moved to rejected/<file> beside rejected/<file>.error.json.

    `file` is the name in rejected/ (`x.yaml`, or `x.yaml.1` when that was taken); the
    error.json's "file" is the name as dropped. `reason` is one word for metrics: invalid,
    not_yaml, too_large, not_regular, symlink, world_writable, not_submitter, not_owner (a
    schedule of the same name is someone else's), unreadable (or unknown: a rejection whose
    report a crash lost, that passes the checks now).
    """

    file: str
    reason: str
    errors: list[dict[str, Any]]


def rejected_path(folder: Path, name: str) -> Path:
    """A free name in rejected/ for a file named `name`: `name`, else `name.1`, `name.2`…
    (free: neither it nor its error.json exists)."""
    n = 0
    while True:
        suffix = f".{n}" if n else ""
        base = fit(name, len(suffix) + len(ERROR_SUFFIX)) + suffix
        path = folder / base
        if not os.path.lexists(path) and not os.path.lexists(path.with_name(base + ERROR_SUFFIX)):
            return path
        n += 1


def write_report(
    target: Path,
    name: str,
    reason: str,
    issues: list[Issue],
    now: datetime,
    dropped: str | None = None,
) -> list[dict[str, Any]]:
    """Write rejected/<target>.error.json for a file dropped as `name`: {file, reason, errors:
    [{path, line, message}], rejected_at}, and `file_id` (see file_id) when `dropped` gives
    it; returns the errors."""
    errors = [i.as_dict() for i in issues]
    doc: dict[str, Any] = {
        "file": json_safe(name),
        "reason": reason,
        "errors": errors,
        "rejected_at": rfc3339(now),
    }
    if dropped is not None:
        doc["file_id"] = dropped
    atomic.write_json(target.with_name(target.name + ERROR_SUFFIX), doc)
    return errors


def reject_claim(
    claim: Path,
    folder: Path,
    name: str,
    reason: str,
    issues: list[Issue],
    st: os.stat_result,
    now: datetime,
) -> Rejected:
    """Move the claim of incoming/<name> into rejected/ (`folder`) and report why."""
    target = rejected_path(folder, name)
    os.rename(claim, target)
    rejected = report_drop(target, name, reason, issues, st, now)
    atomic.fsync_dir(claim.parent)  # the claim's removal, so it is never rejected twice
    return rejected


def report_drop(
    target: Path, name: str, reason: str, issues: list[Issue], st: os.stat_result, now: datetime
) -> Rejected:
    """Write the error.json of `target`, a file dropped as incoming/<name>, and log it."""
    # Handover: error.json completes the rejection (recovery writes it again if lost).
    errors = write_report(target, name, reason, issues, now, file_id(st))
    first = str(issues[0]) if issues else "(no details)"
    more = (
        f" (and {len(issues) - 1} more in rejected/{target.name}{ERROR_SUFFIX})"
        if len(issues) > 1
        else ""
    )
    log.warning("incoming/%s rejected reason=%s: %s%s", show(name), reason, show(first), show(more))
    return Rejected(target.name, reason, errors)


def unreported(folder: Path, copy: re.Pattern[str]) -> list[tuple[str, str]]:
    """The files of rejected/ (`folder`) without their error.json, in name order, each with
    the name it had before (`copy` matches a numbered name, its group 1 being the first
    name). Dot-names are left out. OSError: the folder cannot be listed."""
    entries = set(os.listdir(folder))
    out: list[tuple[str, str]] = []
    for entry in sorted(entries):
        if entry.startswith(".") or entry.endswith(ERROR_SUFFIX) or entry + ERROR_SUFFIX in entries:
            continue
        numbered = copy.fullmatch(entry)
        out.append((entry, numbered.group(1) if numbered else entry))
    return out
