"""`chute submit`'s side of a drop: placing a file into incoming/ and learning what the daemon
made of it.

Owns: the name a submitted file gets in incoming/ (its own, else `<stem>.1.yaml`, `.2`, …,
never one over another file), and finding the outcome of that file: its run, its schedule or
its rejection. Not here: taking the file (chute.intake.drops), following a run (chute.cli).
How a drop knows its run: by the dropped file's identity (chute.intake.filenames.file_id: st_dev and
st_ino, which both renames, into incoming/ and into intake's claim, keep). Intake records it
in the run's trigger.file_id, in a rejection's error.json and in a schedule's owner record
(chute.execution.owners). A name is not enough: `job.yaml` dropped twice in one second names two
runs with one source, and neither the daemon's clock nor ours orders them finer than that. An
identity is unique only while its file exists, so:
- the submitter holds a read-only descriptor of its file until it has found the outcome: no
  other file can get that inode meanwhile, so no run made later can carry it;
- a run made of an earlier file with the same inode was made before that file's claim was
  unlinked, so before our file existed: it is in the listing of runs/ taken once our file
  exists (written under its temp name, not yet renamed into view), and is never a candidate.
While intake holds the file (its claim) nothing is decided yet. A rejection keeps the file
(rejected/<name>[.N], found by its identity); a run or a schedule unlinks it (link count 0),
each only once its run folder or owner record is in place. So link count 0 with neither to
be found means the file was removed before the daemon took it (or a later drop of the same
schedule replaced the owner record first).
Crash safety: the file is written and synced under a dot-temp name the daemon ignores, then
renamed into view in one step (atomic.place); a crash before that leaves only the temp file.
Limits: on a filesystem without RENAME_NOREPLACE (NFS) two submitters may still choose the
same free name at the same instant (atomic.rename_noreplace).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from chute import names
from chute.intake import access
from chute.intake.filenames import file_id, is_spec_name
from chute.intake.rejections import ERROR_SUFFIX
from chute.store import atomic, rundir
from chute.store.spool import Spool

POLL = 0.05  # seconds between looks at runs/ and rejected/


@dataclass(slots=True)
class Placed:
    """A file placed into incoming/, held open (close() once its outcome is known)."""

    source: Path  # the file as given on the command line
    name: str  # its name in incoming/
    file_id: str
    fd: int  # read-only: pins the inode, so the identity stays ours; -1 once closed
    runs_before: frozenset[str] | None  # run folders before it was visible; None: unreadable
    schedule: str | None  # metadata.name, for a file with a schedule

    def close(self) -> None:
        """Let go of the file (once; the descriptor's number may be another file's after)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the daemon made of a placed file. `kind`: run (detail: the run id), schedule (its
    name), rejected (`<reason>: <messages> (<error.json>)`), gone (removed before it was
    taken), waiting (not taken before the deadline), unreadable (runs/ cannot be read: the
    path)."""

    kind: str
    detail: str = ""


def drop_name(source: Path) -> str:
    """The name `source` is first tried under in incoming/: never a dot-name (the daemon
    ignores those), always a spec suffix (`job` becomes `job.yaml`)."""
    name = source.name.lstrip(".")
    if not is_spec_name(name):
        name = f"{name or 'job'}.yaml"
    return name


def place(spool: Spool, source: Path, data: bytes, *, schedule: str | None) -> Placed:
    """Write `data` into incoming/ under the first free name for `source`, atomically."""
    spool.incoming.mkdir(parents=True, exist_ok=True)
    first = drop_name(source)
    tmp, fd = atomic.write_unplaced(spool.incoming / first, data)
    try:
        identity = file_id(os.fstat(fd))
        before = _run_folders(spool)  # now that the file exists: see the module docstring
        for name in _names(first):
            try:
                atomic.place(tmp, spool.incoming / name)
                break
            except FileExistsError:
                continue
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Placed(source, name, identity, fd, before, schedule)


def verdict(spool: Spool, placed: Placed, *, deadline: float | None) -> Verdict:
    """Wait until the daemon has decided about `placed` (or `deadline`, a monotonic time,
    has passed; None waits for as long as it takes)."""
    if placed.runs_before is None:
        return Verdict("unreadable", str(spool.runs))
    looked = set(placed.runs_before)
    while True:
        run_id = _find_run(spool, placed.file_id, looked)
        if run_id is not None:
            return Verdict("run", run_id)
        if os.fstat(placed.fd).st_nlink == 0:
            # Taken and unlinked: its run folder or schedule record was in place first.
            run_id = _find_run(spool, placed.file_id, looked)
            if run_id is not None:
                return Verdict("run", run_id)
            if placed.schedule is not None:
                record = access.schedule_record(spool, placed.schedule)
                if record is not None and record.get("file_id") == placed.file_id:
                    return Verdict("schedule", placed.schedule)
            return Verdict("gone")
        if _identity(spool.incoming / placed.name) != placed.file_id:
            report = _rejection(spool, placed)
            if report is not None:
                return Verdict("rejected", report)
        if deadline is not None and time.monotonic() >= deadline:
            return Verdict("waiting")
        time.sleep(POLL)


def _names(first: str) -> Iterator[str]:
    stem, suffix = first.rsplit(".", 1)
    yield first
    for n in itertools.count(1):
        yield f"{stem}.{n}.{suffix}"


def _run_folders(spool: Spool) -> frozenset[str] | None:
    try:
        return frozenset(n for n in os.listdir(spool.runs) if names.is_run_id(n))
    except FileNotFoundError:
        return frozenset()
    except PermissionError:
        return None


def _identity(path: Path) -> str | None:
    try:
        return file_id(os.lstat(path))
    except FileNotFoundError:
        return None


def _find_run(spool: Spool, identity: str, looked: set[str]) -> str | None:
    """The run folder not in `looked` whose trigger.file_id is `identity`; folders read
    whole are added to `looked` (one still being made is read again next time)."""
    try:
        entries = os.listdir(spool.runs)
    except FileNotFoundError:
        return None
    for entry in sorted(set(entries) - looked):
        if not names.is_run_id(entry):
            looked.add(entry)
            continue
        try:
            record = rundir.read_json(spool.runs / entry / "run.json")
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue  # being made
        except OSError:
            looked.add(entry)
            continue
        looked.add(entry)
        trigger = record.get("trigger") if isinstance(record, dict) else None
        if isinstance(trigger, dict) and trigger.get("file_id") == identity:
            return entry
    return None


def _rejection(spool: Spool, placed: Placed) -> str | None:
    """`<reason>: <messages> (<error.json>)` once the rejection of `placed` is written."""
    try:
        entries = os.listdir(spool.rejected)
    except OSError:
        return None
    prefix = placed.name[:64]  # intake may cut a long name to fit `.N.error.json`
    for entry in entries:
        if not entry.startswith(prefix) or entry.endswith(ERROR_SUFFIX):
            continue
        if _identity(spool.rejected / entry) != placed.file_id:
            continue
        report = spool.rejected / f"{entry}{ERROR_SUFFIX}"
        try:
            doc = rundir.read_json(report)
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None  # renamed there, its report not written yet
        except OSError as exc:
            return f"unknown: its report cannot be read: {exc.strerror} ({report})"
        errors = doc.get("errors") if isinstance(doc, dict) else None
        messages = "; ".join(
            str(e.get("message", ""))
            for e in (errors if isinstance(errors, list) else [])[:3]
            if isinstance(e, dict)
        )
        reason = doc.get("reason") if isinstance(doc, dict) else None
        return f"{reason}: {messages} ({report})"
    return None
