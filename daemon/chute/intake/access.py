"""Who submitted each run and schedule, and who may act on it (processes: chute.execution.owners).

Owns: the rules. A file may be dropped by anyone who can write incoming/, or only by the
`submitters` when the config lists some. A run may be cancelled or retried, and a schedule
unscheduled or replaced, by its submitter, root, the daemon's own user, and the `admins`
(users, or members of groups, in the config). Also state/owners/<schedule>.json, the record
of who submitted each schedule and from which dropped file ({schedule, submitted_by: {uid,
user}, source, file_id, accepted_at}); a run keeps the same facts in its run.json
(submitted_by, trigger.source, trigger.file_id). Not here: taking files (chute.intake.decision
writes the record, chute.intake.inspection and chute.intake.decision apply the rules to
drops), reading requests (chute.intake.control, which applies them to requests).
Why a record of its own: schedules/<name>.yaml is the daemon's copy of the bytes, owned by
the daemon's user, so neither its owner nor its content says who dropped it.
Who is asking: the uid that owns the dropped file or the request, from fstat of the
descriptor it is read through (a user cannot make a file owned by someone else). Group
membership is the user database's (getgrouplist), not the groups of the process that wrote.
Crash safety: intake writes the record (atomically) before schedules/<name>.yaml and both
before it unlinks the claim, so a crash in between redoes both from the claim. A record
without its schedule file (unscheduled by deleting the file) is stale and harmless: the
next schedule of that name writes its own first.
Diagnostics: a refusal is one line naming who asked, whose it is and who may, for rejected/;
a missing or unreadable record reads as None: no submitter is known, so only root, the
daemon's user and the admins may act on that schedule.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from chute.config import Config
from chute.store import atomic
from chute.store.spool import Spool

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


def schedule_submitter(spool: Spool, name: str) -> dict[str, Any] | None:
    """submitted_by of schedule `name` ({uid, user}), or None when it is not known."""
    record = schedule_record(spool, name)
    by = record.get("submitted_by") if record is not None else None
    return by if isinstance(by, dict) else None


def forget_schedule(spool: Spool, name: str) -> None:
    """Remove the record of a schedule whose file is gone (not synced: a record back after a
    power loss is stale, see the module's crash safety)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(schedule_record_path(spool, name))


def submitter_refusal(uid: int, config: Config) -> str | None:
    """Why a file owned by `uid` may not be dropped (`submitters`), or None when it may."""
    users, groups = config.submitters_users, config.submitters_groups
    if (not users and not groups) or _listed(uid, users, groups):
        return None
    return (
        f"is owned by {_who(uid)}, who is not among the submitters ({_listing(users, groups)}); "
        "drop it as one of them, or ask an operator to add the user or a group to submitters "
        "in the config"
    )


def refusal(uid: int, owner: Mapping[str, Any] | None, config: Config, action: str) -> str | None:
    """Why `uid` may not `action` (`cancel run <id>`, …) on what `owner` (a submitted_by
    record; None: not known) submitted, or None when it may."""
    if uid in (0, os.geteuid()) or _listed(uid, config.admins_users, config.admins_groups):
        return None
    owner_uid = owner.get("uid") if owner is not None else None
    if isinstance(owner_uid, int) and owner_uid == uid:
        return None
    whose = (
        f"it was submitted by {_who(owner_uid)}"
        if isinstance(owner_uid, int)
        else "who submitted it is not known"
    )
    admins = _listing(config.admins_users, config.admins_groups) or "none in the config"
    return (
        f"{_who(uid)} may not {action}: {whose}; only its submitter, root, the daemon's user "
        f"({_who(os.geteuid())}) and the admins ({admins}) may — ask one of them, or an operator "
        "to add you to admins in the config"
    )


def _listed(uid: int, users: tuple[str, ...], groups: tuple[str, ...]) -> bool:
    """Whether `uid` is one of `users` or a member of one of `groups`."""
    if not users and not groups:
        return False
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return False
    if pw.pw_name in users:
        return True
    gids = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    for group in groups:
        try:
            if grp.getgrnam(group).gr_gid in gids:
                return True
        except KeyError:
            continue
    return False


def _who(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid} (no such user)"


def _listing(users: tuple[str, ...], groups: tuple[str, ...]) -> str:
    return "; ".join(
        f"{what}: {', '.join(names)}"
        for what, names in (("users", users), ("groups", groups))
        if names
    )
