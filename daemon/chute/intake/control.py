"""Requests from the CLI to the daemon: control/<name>.json, one file each.

Owns: control/ (writing a request, reading and checking one), the form of each action
(cancel, retry, unschedule), moving a bad request to rejected/, and removing a schedule
file on request. Not here: what a request does to runs (the daemon, chute.engine.runs).
Crash safety: the request file is written atomically (atomic.drop) before the CLI reports
anything, and the CLI acknowledges only the effect: a cancel once the run has ended, an
unschedule once the schedule file is gone, a retry once its run is queued (the daemon can
still refuse a retry whose run was removed after the CLI checked it: that id is never
printed). The daemon makes a request's effect durable first (a cancel mark in
the run folder, a retry's run folder and queue file, a schedule file's removal with its
folder synced), then removes the file (`finish`; crash point `control.recorded` just
before). A crash before the removal replays the request, and each handler finds its own
work done or half done and finishes it; a crash after it finds the effect on disk. A bad
request is renamed into rejected/, then its error.json is written; `repair` (at start)
writes an error.json a crash left out.
Who may: the requester is the uid owning the request file (fstat of the descriptor it is
read through; a file with other names, or writable by anyone, is refused, as intake refuses
such drops); `authorize` applies chute.execution.owners' rules: the submitter of the run or
schedule, root, the daemon's user or an admin. The CLI knows its request's name, so it finds a
refusal at rejected/<name>.error.json and prints its reason.
Retention keeps the runs that waiting retry requests name (retried_runs), so a retry is
refused only when its run went between the CLI's check and its request.
Diagnostics: a bad request (not JSON, not an object, an unknown action, missing, unknown or
mistyped fields, a name not of its kind's form, over MAX_SIZE, a symlink, FIFO, folder or
hard link, world-writable, or from someone who may not) goes to rejected/<name> beside
<name>.error.json (reason bad_request, too_large, not_regular, symlink, world_writable or
not_owner) with one WARNING line. Dot-names and names not ending in .json are
left alone, as intake leaves them in incoming/.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import orjson

from chute import names
from chute.config import Config
from chute.faults import crash_point
from chute.intake import access
from chute.intake.rejections import rejected_path, unreported, write_report
from chute.spec.load import Issue, read_upto
from chute.store import atomic, rundir, taskfiles
from chute.store.spool import Spool

log = logging.getLogger(__name__)

SUFFIX = ".json"
MAX_SIZE = 4096  # bytes; a request is about 150
_REJECTED_COPY = re.compile(r"(.+\.json)\.\d+")


@dataclass(frozen=True, slots=True)
class Cancel:
    action: ClassVar[str] = "cancel"
    run: str

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "run": self.run}


@dataclass(frozen=True, slots=True)
class Retry:
    action: ClassVar[str] = "retry"
    run: str
    from_stage: str | None
    new_run_id: str

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "run": self.run,
            "from": self.from_stage,
            "new_run_id": self.new_run_id,
        }


@dataclass(frozen=True, slots=True)
class Unschedule:
    action: ClassVar[str] = "unschedule"
    name: str

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "name": self.name}


Request = Cancel | Retry | Unschedule
_FIELDS = {"cancel": ("run",), "retry": ("run", "from", "new_run_id"), "unschedule": ("name",)}


class BadRequest(Exception):
    """A request that cannot be carried out as written: `reason` is the metric's word,
    `field` the JSON field at fault ("" for the whole file), str() the message."""

    def __init__(self, reason: str, field: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field


def submit(spool: Spool, request: Request) -> Path:
    """Hand `request` to the daemon: one file in control/, written atomically."""
    name = f"{time.time_ns()}-{os.getpid()}-{request.action}{SUFFIX}"
    path = spool.control / name
    atomic.drop(path, orjson.dumps(request.as_json()))
    return path


def pending(spool: Spool) -> list[str]:
    """Names in control/ to look at, oldest first (the CLI's names start with the time)."""
    try:
        entries = os.listdir(spool.control)
    except FileNotFoundError:
        return []
    return sorted(n for n in entries if not n.startswith(".") and n.endswith(SUFFIX))


def retried_runs(spool: Spool) -> set[str]:
    """The runs that retry requests waiting in control/ name: retention keeps them until
    the daemon has made the retries (unreadable or bad requests are the daemon's to
    reject, and name nothing here)."""
    out: set[str] = set()
    for name in pending(spool):
        try:
            request, _ = read(spool, name)
        except (BadRequest, OSError):
            continue
        if isinstance(request, Retry):
            out.add(request.run)
    return out


def read(spool: Spool, name: str) -> tuple[Request, int]:
    """The request in control/<name> and its requester (the uid owning the file, from fstat
    of the descriptor it is read through), read without following a link or blocking on a
    FIFO. BadRequest says why it is refused; FileNotFoundError: gone; another OSError: the
    environment (EACCES on the spool)."""
    return _read(spool.control / name)


def _read(path: Path) -> tuple[Request, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadRequest("symlink", "", "is a symbolic link, not the request") from None
        if exc.errno == errno.ENXIO:
            raise BadRequest("not_regular", "", "is a socket, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = taskfiles.kind(st.st_mode)
            raise BadRequest("not_regular", "", f"is {what}, not a regular file")
        # Its owner is the requester: it must be that user's own file, which nobody else
        # could have written (as intake's rules for a dropped file).
        if st.st_nlink > 1:
            raise BadRequest(
                "not_regular",
                "",
                f"has {st.st_nlink} hard links; a request must be a file of its own, written "
                "by its requester",
            )
        if st.st_mode & stat.S_IWOTH:
            raise BadRequest(
                "world_writable",
                "",
                f"is world-writable (mode {stat.S_IMODE(st.st_mode):04o}); anyone could have "
                "written it — chmod o-w it, or make the request with the chute CLI",
            )
        data = read_upto(fd, MAX_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SIZE:
        raise BadRequest(
            "too_large", "", f"is over {MAX_SIZE} bytes; a request is one small JSON object"
        )
    return parse(data), st.st_uid


def parse(data: bytes) -> Request:
    """The request `data` holds; BadRequest (reason bad_request) says what is wrong."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("bad_request", "", f"is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(
            "bad_request",
            "",
            f"is a JSON {_json_kind(doc)}, not an object; a request is "
            '{"action": "cancel" | "retry" | "unschedule", ...}',
        )
    action = doc.get("action")
    if not isinstance(action, str) or action not in _FIELDS:
        raise BadRequest(
            "bad_request",
            "action",
            f"{_short(action)} is not an action; the actions are cancel, retry, unschedule",
        )
    fields = _FIELDS[action]
    unknown = sorted(str(k) for k in doc if k != "action" and k not in fields)
    if unknown:
        raise BadRequest(
            "bad_request",
            unknown[0],
            f"unknown field of a {action} request (its fields: action, {', '.join(fields)})",
        )

    def get(key: str, check: Any, *args: str, optional: bool = False) -> Any:
        if key not in doc or (optional and doc[key] is None):
            if optional:
                return None
            raise BadRequest("bad_request", key, f"missing; a {action} request needs it")
        try:
            return check(doc[key], *args)
        except names.BadName as exc:
            raise BadRequest("bad_request", key, str(exc)) from None

    if action == "cancel":
        return Cancel(get("run", names.run_id))
    if action == "retry":
        return Retry(
            run=get("run", names.run_id),
            from_stage=get("from", names.name, "stage name", optional=True),
            new_run_id=get("new_run_id", names.run_id),
        )
    return Unschedule(get("name", names.name, "schedule name"))


def authorize(spool: Spool, request: Request, requester: int, config: Config) -> None:
    """BadRequest (reason not_owner) unless `requester` may make `request`
    (chute.execution.owners): a cancel or retry by the run's submitter (run.json's
    submitted_by.uid), an unschedule by the schedule's (state/owners/), or by root, the daemon's
    user or an admin. A request about a run or schedule that does not exist changes nothing and is
    let through (a retry of one is refused by the retry itself)."""
    if isinstance(request, Unschedule):
        if not os.path.lexists(spool.schedules / f"{request.name}.yaml"):
            return
        owner = access.schedule_submitter(spool, request.name)
        action, field = f"unschedule {request.name}", "name"
    else:
        try:
            run = rundir.read_json(spool.runs / request.run / "run.json")
        except FileNotFoundError:
            return
        except (OSError, ValueError):  # unreadable: its submitter is not known
            run = None
        owner = run.get("submitted_by") if isinstance(run, dict) else None
        action, field = f"{request.action} run {request.run}", "run"
    problem = access.refusal(requester, owner if isinstance(owner, dict) else None, config, action)
    if problem is not None:
        raise BadRequest("not_owner", field, problem)


def reject(spool: Spool, name: str, exc: BadRequest, now: datetime) -> None:
    """Move control/<name> to rejected/ and write its error.json; one WARNING line."""
    target = rejected_path(spool.rejected, name)
    os.rename(spool.control / name, target)
    # Handover: error.json completes the rejection (repair() writes one a crash left out).
    _report(target, name, exc, now)
    atomic.fsync_dir(spool.control)  # the request is gone for good: never replayed


def _report(target: Path, name: str, exc: BadRequest, now: datetime) -> None:
    display = f"control/{name}"
    write_report(target, name, exc.reason, [Issue(display, 0, exc.field, str(exc))], now)
    where = f"{exc.field}: " if exc.field else ""
    log.warning(
        "%s rejected reason=%s: %s%s", _short_name(display), exc.reason, where, _short(str(exc))
    )


def finish(spool: Spool, name: str) -> None:
    """The request's effect is durable: remove control/<name>."""
    # Crash point: the effect is durable, the request not yet removed. A restart replays
    # it, and the handler finds its work done.
    crash_point("control.recorded")
    try:
        os.unlink(spool.control / name)
    except FileNotFoundError:
        pass


def repair(spool: Spool, now: datetime) -> int:
    """At start: write the error.json of rejected requests a crash left without one."""
    try:
        lost = unreported(spool.rejected, _REJECTED_COPY)
    except FileNotFoundError:
        return 0
    count = 0
    for entry, name in lost:
        if not name.endswith(SUFFIX):
            continue  # not a request (intake repairs its own)
        exc: BadRequest
        try:
            request, _ = _read(spool.rejected / entry)
        except BadRequest as bad:
            exc = bad
        except OSError:
            continue
        else:
            exc = BadRequest(
                "bad_request",
                "",
                f"was rejected as a {request.action} request, but a crash lost the reason "
                "and it passes the checks now; make the request again",
            )
        _report(spool.rejected / entry, name, exc, now)
        count += 1
    return count


def unschedule_file(spool: Spool, name: str) -> bool:
    """Remove schedules/<name>.yaml (`name` checked by chute.names) and sync the folder, so
    the removal survives a power loss, then its owner record; False when there was no such
    file."""
    try:
        os.unlink(spool.schedules / f"{names.name(name, 'schedule name')}.yaml")
    except FileNotFoundError:
        return False
    atomic.fsync_dir(spool.schedules)
    access.forget_schedule(spool, name)
    return True


def _json_kind(doc: object) -> str:
    if doc is None:
        return "null"
    return {list: "array", str: "string", bool: "boolean"}.get(type(doc), "number")


def _short(value: object) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode(errors="replace")
    text = text if len(text) <= 200 else text[:200] + "…"
    return text if text.isprintable() else repr(text)


def _short_name(text: str) -> str:
    return text if text.isprintable() else repr(text)
