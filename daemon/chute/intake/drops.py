"""Taking dropped files exactly once: incoming/ → state/intake/ → a run, a schedule or rejected/.

Owns: incoming/, state/intake/ (claims), writing queue/<run_id>.yaml, schedules/<name>.yaml
(with its owner record) and rejected/ with its <file>.error.json; the identity of a dropped
file (file_id: run.json's trigger.file_id, error.json's file_id), by which `chute submit`
finds what became of its file; the inotify watch on incoming/ and schedules/.
Not here: parsing and validating a spec (chute.spec), a run folder's files (chute.store.rundir),
starting runs and reading schedules/ (the daemon, chute.engine), when to rescan (the daemon).
Crash safety: every transition is a rename on one filesystem, and a file is in exactly one
of incoming/ → state/intake/<run_id>__<name> → {runs/<run_id>/ + queue/<run_id>.yaml,
schedules/<metadata.name>.yaml, rejected/<name>}. The run id is minted at the claim and
carried in the claim's name, so redoing a handover after a crash finds the run folder it
made before instead of making a second run. Crash points, and what start-up (recover) does:
  1. before the claim rename: the file is still in incoming/; the start-up scan takes it.
  2. claim renamed (both folders fsynced before anything else is written, so the drop can
     never come back to incoming/ once a run exists), no runs/<id>/run.json: redo the
     decision with the same run id; a run folder without run.json is a half-made one and
     is removed first. A run made here is left in queue/ for the daemon, like those of 3.
     The daemon's intake (take_deferred) puts the run folder and queue link in place and
     leaves their fsyncs to the writer thread; the claim is unlinked (release) only once
     they are durable, and the run starts only then. A power loss in between can leave a
     run.json that is empty or torn: that folder is half made too, and is made again.
  3. run.json in place, no queue/<id>.yaml: write it from runs/<id>/spec.yaml (the bytes
     accepted; if its sha256 is not the one run.json records, the sync was lost, and it
     is rewritten from the claim first), unlink the claim. Only while run.json still says
     queued: a run that moved on was handed over already, and its queue file may be gone
     because it finished. (A handover that failed while the daemon runs, ENOSPC say,
     leaves the same state; the next scan finishes it and reports the run as Accepted.
     A claim whose handover is still in the writer thread is not touched by a scan.)
  4. queue file written, claim not yet unlinked: as 3, nothing to write.
  5. recurring: state/owners/<name>.json (who dropped it, chute.execution.owners), then
     schedules/<name>.yaml written, claim not unlinked: redo writes the same record and bytes
     again (the claim's unlink is fsynced, so an older claim never overwrites a newer
     schedule).
  6. rejected: renamed to rejected/<x> but no <x>.error.json: re-validate it and write it.
  7. any atomic write interrupted: `.tmp-*` leftovers in queue/, schedules/, rejected/ and
     state/intake/ are removed.
Postfix's pickup is at-least-once at this step; the claim rename is what closes the window.
We decide from the bytes read through one descriptor and keep our own copy (queue/, and
runs/<id>/spec.yaml), so a writer that kept a descriptor cannot change what runs.
Diagnostics: a user's mistake → rejected/ with error.json and one WARNING line; the
environment (ENOSPC, EACCES on the spool, inotify limits) → one ERROR line naming the path,
the errno and the knob, the claim kept for the next rescan; a chute bug → log.exception,
the claim kept until the next start. A file that vanished under us: DEBUG.
Limits: not thread-safe; call take/scan/recover from one thread (validating a 1 MiB spec
takes ~1 s, so the daemon may run them off its loop, but one at a time). The read lease
needs CAP_LEASE or the file's ownership; without it (EACCES), on filesystems without
leases (EINVAL) and in recovery, "still being written" is judged by size and mtime only.
If incoming/ itself is removed or replaced, the watch goes quiet; rescans still work.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from chute.clock import Clock, parse_rfc3339, rfc3339
from chute.config import Config
from chute.engine import runs
from chute.engine.runs import submitter
from chute.intake import access
from chute.names import is_run_id
from chute.spec import Issue, SpecError, load_bytes
from chute.spec.load import read_upto
from chute.spec.model import Pipeline
from chute.store import atomic, queue, rundir
from chute.store.spool import Spool
from chute.units import format_size

log = logging.getLogger(__name__)

CLAIM_SEP = "__"
IGNORED_SUFFIXES = (".tmp", ".part", ".swp")
SPEC_SUFFIXES = (".yaml", ".yml")
ERROR_SUFFIX = ".error.json"
NAME_MAX = 255
_REJECTED_COPY = re.compile(r"(.+\.ya?ml)\.\d+", re.IGNORECASE)
_LEASE_SIGNAL = signal.SIGURG
"""A broken lease is announced by a signal, SIGIO unless set, whose default action ends the
process: SIGURG's default is to ignore it, and the lease is checked with F_GETLEASE anyway."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """A one-shot file: its run folder (state queued) and queue/<run_id>.yaml exist durably."""

    run_id: str
    pipeline: Pipeline
    spec_bytes: bytes
    source: str  # "incoming/<name>"
    submitted_by: dict[str, Any]
    accepted_at: datetime
    dropped_at: float | None  # epoch s the file last changed in incoming/ (write or rename in)
    record: dict[str, Any]  # its run.json as written (state queued)


@dataclass(frozen=True, slots=True)
class Scheduled:
    """A recurring file, now at schedules/<name>.yaml (replacing one of the same name)."""

    name: str
    pipeline: Pipeline
    spec_bytes: bytes
    path: Path
    accepted_at: datetime
    replaced: bool


@dataclass(frozen=True, slots=True)
class Rejected:
    """Moved to rejected/<file> beside rejected/<file>.error.json.

    `file` is the name in rejected/ (`x.yaml`, or `x.yaml.1` when that was taken); the
    error.json's "file" is the name as dropped. `reason` is one word for metrics: invalid,
    too_large, not_regular, symlink, world_writable, not_submitter, not_owner (a schedule
    of the same name is someone else's), unreadable (or unknown: a rejection whose report a
    crash lost, that passes the checks now).
    """

    file: str
    reason: str
    errors: list[dict[str, Any]]


Outcome = Accepted | Scheduled | Rejected


def is_candidate(name: str) -> bool:
    """A name intake takes: anything not hidden and not a temp or partial file (a name
    without a spec suffix is taken too, and rejected: see is_spec_name)."""
    return not (name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES))


def is_spec_name(name: str) -> bool:
    """`*.yaml` or `*.yml`, in any case: the names a spec may be dropped under."""
    return name.lower().endswith(SPEC_SUFFIXES)


NOT_YAML = (
    "is not named *.yaml or *.yml; chute takes spec files with those suffixes (any case) — "
    "rename it, or write it under a dot-name or with .tmp/.part/.swp until it is complete"
)


class _Gone(Exception):
    """The file vanished under us (moved or removed): a benign race."""


class _NotReady(Exception):
    """Still open for writing, or changed while we read it: a later event retakes it."""


@dataclass(frozen=True, slots=True)
class _Look:
    """What one open descriptor told us: the bytes, or why the file is refused."""

    st: os.stat_result
    data: bytes
    reason: str | None = None
    issues: tuple[Issue, ...] = ()


@dataclass(frozen=True, slots=True)
class Claimed:
    """A file claimed (renamed into state/intake/, durably) and read, not decided yet."""

    run_id: str
    name: str
    claim: Path
    look: _Look
    dropped_at: float | None

    @property
    def size(self) -> int:
        return len(self.look.data)


@dataclass(frozen=True, slots=True)
class _Accept:
    """An accepted file whose run folder is not made yet (the batch's group commit does)."""

    record: dict[str, Any]
    data: bytes
    claim: Path
    accepted: Accepted


@dataclass(frozen=True, slots=True)
class Handover:
    """Runs one batch accepted whose folders and queue links are in place, not yet durable.

    The caller makes `unsynced` durable (a writer thread), then calls Intake.release(); only
    then may the runs start. Until release the claims stay, so a crash in between finishes
    the handover at the next start (crash points 2–4)."""

    accepted: list[Accepted]
    claims: list[Path]
    unsynced: atomic.Unsynced


class Intake:
    def __init__(
        self, spool: Spool, config: Config, *, node_cpus: int, node_memory: int, clock: Clock
    ) -> None:
        self.spool = spool
        self.config = config
        self.node_cpus = node_cpus
        self.node_memory = node_memory
        self.clock = clock
        self.claims = spool.state / "intake"
        self.claims.mkdir(parents=True, exist_ok=True)
        self._stuck: set[str] = set()  # claims a chute bug left; retried at the next start
        self._handing: set[str] = set()  # claims of runs handed over and not yet released
        self._deciding: set[str] = set()  # claims not decided yet (their spec is parsed elsewhere)
        self._lease_warned = False
        self.write_error: OSError | None = None  # the spool could not be written (for healthz)
        self._errors = 0  # environment failures so far, to tell a clean pass

    def _environment(self, exc: OSError, subject: str) -> None:
        """An environment failure (a full disk, permissions): logged once until intake
        succeeds again (a rescan every second would repeat it for every waiting file)."""
        if self.write_error is None or self.write_error.errno != exc.errno:
            _log_environment(exc, subject)
        else:
            log.debug("%s: still failing: %s", subject, exc)
        self.write_error = exc
        self._errors += 1

    # -- the public steps -------------------------------------------------------------

    def take(self, name: str) -> Outcome | None:
        """Take incoming/<name>; None when ignored, gone, not ready yet, or on an error
        that was logged (the file then stays where it is for the next rescan)."""
        if not is_candidate(name):
            log.debug("incoming/%s ignored: not a *.yaml or *.yml name", _show(name))
            return None
        outcomes = self.take_many([name])
        return outcomes[0] if outcomes else None

    def take_many(self, names: Iterable[str]) -> list[Outcome]:
        """Take several names of incoming/ at once, in one group commit: the claims are synced
        together, then every accepted run folder and queue link, so a batch of N files costs
        about 3N + 4 fsyncs instead of 10N. Files not ready, gone or ignored give nothing."""
        return self._take_many(names, durable=True)[0]

    def take_deferred(self, names: Iterable[str]) -> tuple[list[Outcome], Handover | None]:
        """take_many without waiting for the disk: the accepted runs (in the outcomes too)
        have their folders and queue links in place, and `Handover` says what to sync before
        release(). The claims are synced here: a run is never made from an unsynced claim."""
        return self._take_many(names, durable=False)

    def release(self, handover: Handover) -> None:
        """The accepted runs of `handover` are durable: drop their claims, announce them."""
        for claim, accepted in zip(handover.claims, handover.accepted, strict=True):
            # The claim's removal needs no sync: a claim back after a crash finds its run
            # folder and is just removed (crash point 4).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claim)
            self._handing.discard(claim.name)
            log.info(
                "%s accepted pipeline=%s source=%s",
                accepted.run_id,
                accepted.pipeline.name,
                _show(accepted.source),
            )

    def _take_many(
        self, names: Iterable[str], *, durable: bool
    ) -> tuple[list[Outcome], Handover | None]:
        return self.decide_many(self.claim_many(names), durable=durable)

    def claim_many(self, names: Iterable[str]) -> list[Claimed]:
        """Claim these names of incoming/, and make the claims durable. A file gone, not
        ready or ignored gives nothing; the environment's trouble is logged and the file
        stays where it is. Each claim must then be decided (decide_many), now or, after its
        spec was parsed elsewhere, later: until then a rescan leaves it alone."""
        claimed: list[Claimed] = []
        for name in names:
            if not is_candidate(name):
                log.debug("incoming/%s ignored: not a *.yaml or *.yml name", _show(name))
                continue
            try:
                got = self._claim(name)
            except OSError as exc:
                self._environment(exc, f"incoming/{_show(name)}")
                continue
            except Exception:
                log.exception("incoming/%s: intake failed (a chute bug)", _show(name))
                continue
            if got is not None:
                claimed.append(got)
        if not claimed:
            return []
        try:
            # Handover: the claims are durable before any run, schedule or rejection is made
            # from them, so a crash can never bring a drop back to incoming/ for a second run.
            atomic.fsync_dir(self.claims)
            atomic.fsync_dir(self.spool.incoming)
        except OSError as exc:
            self._environment(exc, str(self.claims))
            return []  # the claims stay; the next scan finishes them
        self._deciding.update(c.claim.name for c in claimed)
        return claimed

    def decide_many(
        self,
        claimed: list[Claimed],
        parsed: Mapping[str, Pipeline | SpecError] | None = None,
        *,
        durable: bool = False,
    ) -> tuple[list[Outcome], Handover | None]:
        """Decide claims (claim_many) in one group commit: what each becomes, and the run
        folders and queue links of the accepted ones (durable, or to sync before release).
        `parsed`: the spec of a claim (by its name in state/intake/), parsed elsewhere."""
        errors_before = self._errors
        decided: list[Outcome | _Accept] = []  # in the order of `claimed`
        accepts: list[_Accept] = []
        for c in claimed:
            self._deciding.discard(c.claim.name)
            got = (parsed or {}).get(c.claim.name)
            try:
                outcome = self._finish(
                    c.run_id, c.name, c.claim, c.look, c.dropped_at, accepts, parsed=got
                )
            except OSError as exc:
                self._environment(exc, f"incoming/{_show(c.name)}")
                continue
            except Exception:
                log.exception("incoming/%s: intake failed (a chute bug)", _show(c.name))
                continue
            decided.append(accepts[-1] if outcome is None else outcome)
        handover: Handover | None = None
        if accepts:
            try:
                handover = self._make_runs(accepts, durable=durable)
            except OSError as exc:  # the claims stay for the next scan
                what = (
                    f"incoming/{_show(accepts[0].claim.name.split(CLAIM_SEP, 1)[1])}"
                    if len(accepts) == 1
                    else f"{len(accepts)} files of incoming/"
                )
                self._environment(exc, what)
                decided = [d for d in decided if not isinstance(d, _Accept)]
        outcomes = [d.accepted if isinstance(d, _Accept) else d for d in decided]
        if durable and handover is not None:
            self.release(handover)
            handover = None
        if outcomes and self.write_error is not None and self._errors == errors_before:
            log.warning("intake writes to the spool succeed again")
            self.write_error = None
        return outcomes, handover

    def _make_runs(self, accepts: list[_Accept], *, durable: bool) -> Handover:
        news = [
            runs.NewRun(a.record, a.accepted.pipeline, a.data, a.accepted.accepted_at.timestamp())
            for a in accepts
        ]
        unsynced = runs.make_runs(self.spool, news, queue_files=True, durable=durable)
        # Until release(), a rescan must leave these claims alone: finishing one would hand
        # its run over a second time.
        self._handing.update(a.claim.name for a in accepts)
        return Handover([a.accepted for a in accepts], [a.claim for a in accepts], unsynced)

    def scan(self) -> list[Outcome]:
        """Claims a failed handover left, then every candidate in incoming/, sorted by name.

        Postfix pickup: "keep scanning the queue directory until we stop removing files".
        """
        errors_before = self._errors
        out = self._finish_claims(announce=True)
        while True:
            try:
                names = sorted(os.listdir(self.spool.incoming))
            except OSError as exc:
                self._environment(exc, "incoming/")
                return out
            taken = self.take_many([n for n in names if is_candidate(n)])
            out.extend(taken)
            if not taken:
                if self._errors == errors_before and self.write_error is not None:
                    log.warning("intake writes to the spool succeed again")
                    self.write_error = None
                return out

    def incoming_names(self) -> list[str]:
        """The candidate names in incoming/ now, sorted (the daemon takes them in batches)."""
        try:
            return sorted(n for n in os.listdir(self.spool.incoming) if is_candidate(n))
        except OSError as exc:
            self._environment(exc, "incoming/")
            return []

    def finish_claims(self) -> list[Outcome]:
        """Finish claims a failed handover left (a full disk), as scan() does first; a pass
        without an error says the spool takes writes again."""
        errors_before = self._errors
        out = self._finish_claims(announce=True)
        if self._errors == errors_before and self.write_error is not None:
            log.warning("intake writes to the spool succeed again")
            self.write_error = None
        return out

    def recover(self) -> list[Outcome]:
        """Start-up, before scan(): finish the handovers a crash interrupted.

        Returns the schedules and rejections it finished. Runs it finished are not returned:
        like every run accepted before the crash, each has queue/<run_id>.yaml by now, and
        the daemon starts queued runs from queue/ (returning them too would start them twice).
        """
        for folder in (
            self.spool.queue,
            self.spool.schedules,
            self.spool.rejected,
            self.claims,
            self.spool.state / access.FOLDER,
        ):
            removed = atomic.remove_temp_leftovers(folder)
            if removed:
                log.info("%s: removed %d temp file(s) an interrupted write left", folder, removed)
        self._stuck.clear()
        finished = self._finish_claims(announce=False)
        return [o for o in finished if not isinstance(o, Accepted)] + self._repair_rejected()

    # -- claim ------------------------------------------------------------------------

    def _claim(self, name: str) -> Claimed | None:
        """Inspect incoming/<name> and claim it by a rename (not yet synced)."""
        path = self.spool.incoming / name
        display = f"incoming/{name}"
        try:
            look = self._inspect(path, display, lease=True)
        except _Gone:
            log.debug("%s gone before it was taken", _show(display))
            return None
        except _NotReady as exc:
            log.debug("%s not ready: %s", _show(display), exc)
            return None
        run_id = rundir.new_run_id(self.clock.now())
        while os.path.lexists(self.spool.runs / run_id):  # same second, same 24 random bits
            run_id = rundir.new_run_id(self.clock.now())
        claim = self.claims / _claim_name(run_id, name)
        try:
            os.rename(path, claim)
        except FileNotFoundError:
            log.debug("%s gone before it was claimed", _show(display))
            return None
        dropped_at: float | None = look.st.st_ctime
        now_st = os.lstat(claim)
        if (now_st.st_dev, now_st.st_ino) != (look.st.st_dev, look.st.st_ino):
            # Replaced between our read and the rename: decide what we actually claimed.
            dropped_at = None
            try:
                look = self._inspect(claim, display, lease=False)
            except (_Gone, _NotReady) as exc:
                log.debug("%s replaced while taken; left for the next rescan: %s", claim, exc)
                return None
        return Claimed(run_id, name, claim, look, dropped_at)

    def _inspect(self, path: Path, display: str, *, lease: bool) -> _Look:
        """Judge `path` without following or blocking, and read it if it may be a spec."""

        def refuse(reason: str, st: os.stat_result, message: str) -> _Look:
            return _Look(st, b"", reason, (Issue(display, 0, "", message),))

        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            raise _Gone from None
        if stat.S_ISLNK(lst.st_mode):
            return refuse("symlink", lst, "is a symbolic link; drop the file itself, not a link")
        if not stat.S_ISREG(lst.st_mode):
            return refuse("not_regular", lst, _not_regular(lst.st_mode))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _Gone from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return refuse("symlink", lst, "is a symbolic link; drop the file itself")
            if exc.errno == errno.ENXIO:  # became a socket after lstat
                return refuse("not_regular", lst, "is a socket, not a regular file")
            return refuse("unreadable", lst, _unreadable("open", exc))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped after lstat; O_NONBLOCK kept us going
                return refuse("not_regular", st, _not_regular(st.st_mode))
            leased = lease and self._lease(fd)
            try:
                problem = self._refusal(st)
                if problem is not None:
                    return refuse(problem[0], st, problem[1])
                try:
                    data = read_upto(fd, self.config.max_file_size + 1)
                except OSError as exc:
                    return refuse("unreadable", st, _unreadable("read", exc))
                after = os.fstat(fd)
                if leased and fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
                    raise _NotReady("opened for writing while being read")
                if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or len(
                    data
                ) != st.st_size:
                    raise _NotReady("changed while being read")
                return _Look(st, data)
            finally:
                if leased:
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        finally:
            os.close(fd)

    def _lease(self, fd: int) -> bool:
        """Take a read lease: it fails while anyone has the file open for writing."""
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_SIGNAL)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                raise _NotReady("still open for writing") from None
            if not self._lease_warned:  # EACCES without CAP_LEASE, EINVAL on NFS and FUSE
                self._lease_warned = True
                log.info(
                    "intake cannot take read leases (%s); judging files still being written "
                    "by size and mtime only: run the daemon with CAP_LEASE for the lease check",
                    exc.strerror,
                )
            return False

    def _refusal(self, st: os.stat_result) -> tuple[str, str] | None:
        """The reason and message to refuse a regular file for, from fstat alone."""
        limit = self.config.max_file_size
        if st.st_nlink > 1:
            return "not_regular", (
                f"has {st.st_nlink} hard links; a dropped file must have only its own name "
                "— write a new file, then rename it into incoming/"
            )
        if st.st_size > limit:
            return "too_large", (
                f"is {format_size(st.st_size)} ({st.st_size} bytes), over the limit of "
                f"{format_size(limit)} ({limit} bytes); a spec is small — pass big data by "
                "reference, or raise max_file_size in the config"
            )
        if st.st_mode & stat.S_IWOTH:
            return "world_writable", (
                f"is world-writable (mode {stat.S_IMODE(st.st_mode):04o}); anyone could change "
                "it after it was checked — chmod o-w it, then drop it again"
            )
        problem = access.submitter_refusal(st.st_uid, self.config)
        return None if problem is None else ("not_submitter", problem)

    # -- decide and hand over ----------------------------------------------------------

    def parse(self, data: bytes, name: str) -> Pipeline | SpecError:
        """The spec a dropped file `name` holds, or why it is invalid. Pure (reads no file,
        writes nothing): a caller may run it on another thread."""
        try:
            return load_bytes(
                data, f"incoming/{name}", node_cpus=self.node_cpus, node_memory=self.node_memory
            )
        except SpecError as exc:
            return exc

    def _finish(
        self,
        run_id: str,
        name: str,
        claim: Path,
        look: _Look,
        dropped_at: float | None,
        accepts: list[_Accept] | None = None,
        *,
        parsed: Pipeline | SpecError | None = None,
    ) -> Outcome | None:
        """Decide a claimed file. With `accepts`, an accepted one is prepared and added there
        for the caller's group commit (returns None); without, it is committed now.
        `parsed`: what parse(look.data, ...) gave elsewhere (None: parse it here)."""
        display = f"incoming/{name}"
        reason, issues = look.reason, list(look.issues)
        if reason is None and not is_spec_name(name):
            reason, issues = "not_yaml", [Issue(display, 0, "", NOT_YAML)]
        pipeline: Pipeline | None = None
        if reason is None:
            try:
                if parsed is None:
                    parsed = self.parse(look.data, name)
                if isinstance(parsed, SpecError):
                    raise parsed
                pipeline = parsed
            except SpecError as exc:
                reason, issues = "invalid", exc.issues
        if pipeline is None or reason is not None:
            return self._reject(claim, name, reason or "invalid", issues, look.st)
        if pipeline.schedule is not None:
            return self._schedule(claim, name, pipeline, look)
        accept = self._prepare_accept(run_id, claim, name, pipeline, look, dropped_at)
        if accepts is not None:
            accepts.append(accept)
            return None
        self.release(self._make_runs([accept], durable=True))
        return accept.accepted

    def _prepare_accept(
        self,
        run_id: str,
        claim: Path,
        name: str,
        pipeline: Pipeline,
        look: _Look,
        dropped_at: float | None,
    ) -> _Accept:
        now = self.clock.now()
        source = f"incoming/{_json_safe(name)}"
        by = submitter(look.st.st_uid)
        record = runs.new_run(
            pipeline,
            look.data,
            trigger={"type": "drop", "source": source, "file_id": file_id(look.st)},
            now=now,
            run_id=run_id,
            submitted_by=by,
        ).record
        accepted = Accepted(run_id, pipeline, look.data, source, by, now, dropped_at, record)
        return _Accept(record, look.data, claim, accepted)

    def _schedule(
        self, claim: Path, name: str, pipeline: Pipeline, look: _Look
    ) -> Scheduled | Rejected:
        now = self.clock.now()
        data = look.data
        path = self.spool.schedules / f"{pipeline.name}.yaml"
        replaced = os.path.lexists(path)
        if replaced:  # replacing a schedule ends it: the same rule as unscheduling it
            problem = access.refusal(
                look.st.st_uid,
                access.schedule_submitter(self.spool, pipeline.name),
                self.config,
                f"replace schedule {pipeline.name}",
            )
            if problem is not None:
                issue = Issue(
                    f"incoming/{name}",
                    0,
                    "metadata.name",
                    f"{problem} (or give this file another metadata.name)",
                )
                return self._reject(claim, name, "not_owner", [issue], look.st)
        # Who submitted it, before the schedule file: a crash in between redoes both.
        access.record_schedule(
            self.spool,
            pipeline.name,
            {
                "schedule": pipeline.name,
                "submitted_by": submitter(look.st.st_uid),
                "source": f"incoming/{_json_safe(name)}",
                "file_id": file_id(look.st),
                "accepted_at": rfc3339(now),
            },
        )
        # Handover: the schedule file is the recurring definition from now on.
        atomic.write_bytes(path, data)
        os.unlink(claim)
        atomic.fsync_dir(self.claims)  # a stale claim must not overwrite a newer schedule
        log.info(
            "schedule %s %s source=incoming/%s",
            pipeline.name,
            "replaced" if replaced else "added",
            _show(name),
        )
        return Scheduled(pipeline.name, pipeline, data, path, now, replaced)

    def _reject(
        self, claim: Path, name: str, reason: str, issues: list[Issue], st: os.stat_result
    ) -> Rejected:
        target = self._rejected_path(name)
        os.rename(claim, target)
        rejected = self._report(target, name, reason, issues, st)
        atomic.fsync_dir(self.claims)  # the claim's removal, so it is never rejected twice
        return rejected

    def _report(
        self, target: Path, name: str, reason: str, issues: list[Issue], st: os.stat_result
    ) -> Rejected:
        # Handover: error.json completes the rejection (crash point 6 rewrites it).
        errors = write_report(target, name, reason, issues, self.clock.now(), file_id(st))
        first = str(issues[0]) if issues else "(no details)"
        more = (
            f" (and {len(issues) - 1} more in rejected/{target.name}{ERROR_SUFFIX})"
            if len(issues) > 1
            else ""
        )
        log.warning(
            "incoming/%s rejected reason=%s: %s%s", _show(name), reason, _show(first), _show(more)
        )
        return Rejected(target.name, reason, errors)

    def _rejected_path(self, name: str) -> Path:
        return rejected_path(self.spool.rejected, name)

    # -- recovery ---------------------------------------------------------------------

    def _finish_claims(self, *, announce: bool) -> list[Outcome]:
        """Finish every claim in state/intake/. `announce`: also return runs that were made
        but never reported (a handover that failed while running; at start-up the daemon
        finds those in queue/ itself)."""
        out: list[Outcome] = []
        try:
            entries = sorted(os.listdir(self.claims))
        except OSError as exc:
            self._environment(exc, str(self.claims))
            return out
        for entry in entries:
            if entry.startswith(".") or entry in self._stuck or entry in self._handing:
                continue
            if entry in self._deciding:
                continue
            try:
                outcome = self._finish_claim(entry, announce=announce)
            except OSError as exc:
                self._environment(exc, str(self.claims / entry))
                continue
            except Exception:
                log.exception("%s: finishing the claim failed (a chute bug)", self.claims / entry)
                self._stuck.add(entry)
                continue
            if outcome is not None:
                out.append(outcome)
        return out

    def _finish_claim(self, entry: str, *, announce: bool) -> Outcome | None:
        run_id, sep, name = entry.partition(CLAIM_SEP)
        claim = self.claims / entry
        if not sep or not is_run_id(run_id) or not name:
            log.warning("%s: not a claim intake made; left alone", claim)
            self._stuck.add(entry)
            return None
        run_dir = self.spool.runs / run_id
        try:
            record = rundir.read_json(run_dir / "run.json")
            if not isinstance(record, dict):
                raise ValueError("run.json is not a JSON object")
        except FileNotFoundError:
            record = None
        except ValueError:  # orjson.JSONDecodeError too
            # A power loss before the writer thread synced it (take_deferred): the folder is
            # half made, like one without run.json (crash point 2).
            log.warning("%s: run.json of a run not yet handed over is damaged; remaking it", claim)
            shutil.rmtree(run_dir)
            record = None
        if record is not None:  # crash points 3 and 4: the run exists
            if record.get("state") != "queued":  # handed over already
                os.unlink(claim)
                return None
            try:
                data = (run_dir / "spec.yaml").read_bytes()
            except FileNotFoundError:
                data = b""
            if hashlib.sha256(data).hexdigest() != record.get("spec_sha256"):
                # Not synced before a power loss: the claim holds the bytes that were accepted.
                data = claim.read_bytes()
                atomic.write_bytes(run_dir / "spec.yaml", data)
                queue.remove(self.spool, run_id)  # a link to the damaged copy
                log.warning("%s recovered: spec.yaml was missing or damaged; rewrote it", run_id)
            if not queue.exists(self.spool, run_id):
                queue.make(self.spool, run_id, data)
                log.info(
                    "%s recovered: wrote %s a crash left out",
                    run_id,
                    queue.path(self.spool, run_id),
                )
            os.unlink(claim)
            if not announce:
                return None
            display = str(record["trigger"].get("source", f"incoming/{name}"))
            pipeline = load_bytes(
                data, display, node_cpus=self.node_cpus, node_memory=self.node_memory
            )
            return Accepted(
                run_id,
                pipeline,
                data,
                display,
                record["submitted_by"],
                parse_rfc3339(record["created_at"]),
                None,
                record,
            )
        try:  # crash point 2: decide again, with the same run id
            look = self._inspect(claim, f"incoming/{name}", lease=False)
        except (_Gone, _NotReady) as exc:
            log.debug("%s not finished: %s", claim, exc)
            return None
        log.info("%s recovered: finishing the intake of incoming/%s", run_id, _show(name))
        return self._finish(run_id, name, claim, look, None)

    def _repair_rejected(self) -> list[Outcome]:
        try:
            names = set(os.listdir(self.spool.rejected))
        except OSError as exc:
            self._environment(exc, str(self.spool.rejected))
            return []
        out: list[Outcome] = []
        for entry in sorted(names):
            if entry.startswith(".") or entry.endswith(ERROR_SUFFIX):
                continue
            if entry + ERROR_SUFFIX in names:
                continue
            copy = _REJECTED_COPY.fullmatch(entry)
            name = copy.group(1) if copy else entry
            path = self.spool.rejected / entry
            display = f"incoming/{name}"
            try:
                look = self._inspect(path, display, lease=False)
            except (_Gone, _NotReady):
                continue
            reason, issues = look.reason, list(look.issues)
            if reason is None and not is_spec_name(name):
                reason, issues = "not_yaml", [Issue(display, 0, "", NOT_YAML)]
            if reason is None:
                try:
                    load_bytes(
                        look.data, display, node_cpus=self.node_cpus, node_memory=self.node_memory
                    )
                    reason = "unknown"
                    issues = [
                        Issue(
                            display,
                            0,
                            "",
                            "was rejected, but a crash lost the reason and it passes the "
                            "checks now — drop it again to submit it",
                        )
                    ]
                except SpecError as exc:
                    reason, issues = "invalid", exc.issues
            try:
                out.append(self._report(path, name, reason, issues, look.st))
            except OSError as exc:
                self._environment(exc, str(path))
        return out


class Watcher:
    """inotify on incoming/ (ready files) and schedules/ (deletions), read on the caller's loop.

    Raw events, not watchdog's Observer: that one holds an unmatched moved-from for 0.5 s and
    queues every later event behind it, and each claim is such a moved-from.
    """

    def __init__(self, spool: Spool) -> None:
        try:
            from watchdog.observers.inotify_c import (
                InotifyConstants,
                inotify_add_watch,
                inotify_init,
            )
        except (ImportError, OSError) as exc:  # no inotify in this libc
            raise OSError(
                errno.ENOSYS, f"inotify is not available ({exc}); set watch: poll in the config"
            ) from None
        c = InotifyConstants
        self._overflow_mask = c.IN_Q_OVERFLOW
        fd = inotify_init()
        if fd < 0:
            raise _inotify_error(ctypes.get_errno(), "inotify_init", None)
        self._fd = fd
        try:
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
            watches: dict[int, tuple[str, int]] = {}
            for folder, mask in (
                # IN_CREATE too: a FIFO or symlink made in place sends nothing else; a
                # regular file still open for writing is "not ready" to take() anyway.
                (spool.incoming, c.IN_CLOSE_WRITE | c.IN_MOVED_TO | c.IN_CREATE),
                (spool.schedules, c.IN_DELETE | c.IN_MOVED_FROM),
            ):
                wd = inotify_add_watch(fd, os.fsencode(folder), mask | c.IN_ONLYDIR)
                if wd < 0:
                    raise _inotify_error(ctypes.get_errno(), "inotify_add_watch", folder)
                watches[wd] = (folder.name, mask)
        except BaseException:
            os.close(fd)
            raise
        self._watches = watches

    def fileno(self) -> int:
        return self._fd

    def read(self) -> tuple[list[str], list[str], bool]:
        """Drain pending events: (incoming names ready, schedule names deleted, overflowed).

        Names are de-duplicated in arrival order and filtered with is_candidate (and, in
        schedules/, to the `<name>.yaml` files intake writes there). On overflow
        events were lost: the caller must rescan incoming/ and schedules/.
        """
        ready: dict[str, None] = {}
        deleted: dict[str, None] = {}
        overflowed = False
        for _ in range(64):  # at most 4 MiB per call; the fd stays readable for the rest
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            pos = 0
            while pos + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size : pos + _EVENT.size + length]
                pos += _EVENT.size + length
                if mask & self._overflow_mask:
                    overflowed = True
                    continue
                watch = self._watches.get(wd)
                if watch is None or not mask & watch[1]:
                    continue
                name = os.fsdecode(raw.split(b"\0", 1)[0])
                if not is_candidate(name):
                    continue
                if watch[0] == "incoming":
                    ready[name] = None
                elif name.endswith(".yaml"):  # schedules/<metadata.name>.yaml only
                    deleted[name] = None
        return list(ready), list(deleted), overflowed

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


def rejected_path(folder: Path, name: str) -> Path:
    """A free name in rejected/ for a file named `name`: `name`, else `name.1`, `name.2`…
    (free: neither it nor its error.json exists)."""
    n = 0
    while True:
        suffix = f".{n}" if n else ""
        base = _fit(name, len(suffix) + len(ERROR_SUFFIX)) + suffix
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
        "file": _json_safe(name),
        "reason": reason,
        "errors": errors,
        "rejected_at": rfc3339(now),
    }
    if dropped is not None:
        doc["file_id"] = dropped
    atomic.write_json(target.with_name(target.name + ERROR_SUFFIX), doc)
    return errors


def file_id(st: os.stat_result) -> str:
    """`<st_dev>:<st_ino>`: which file was dropped, as run.json's trigger.file_id, an
    error.json's file_id and a schedule's owner record carry it. `chute submit` knows it of
    the file it placed (a rename keeps the inode), and holds the file open until it has found
    its outcome, so no other file can have that identity meanwhile (chute.intake.submission)."""
    return f"{st.st_dev}:{st.st_ino}"


def _inotify_error(err: int, call: str, folder: Path | None) -> OSError:
    where = f" {folder}" if folder is not None else ""
    text = os.strerror(err)
    if err == errno.ENOSPC:
        hint = (
            "the inotify watch limit is reached: raise fs.inotify.max_user_watches "
            "(sysctl -w fs.inotify.max_user_watches=524288)"
        )
    elif err == errno.EMFILE:
        hint = (
            "the inotify instance limit (or the open-file limit) is reached: raise "
            "fs.inotify.max_user_instances (sysctl -w fs.inotify.max_user_instances=1024) "
            "or LimitNOFILE="
        )
    elif err == errno.ENOSYS:
        hint = "this kernel has no inotify"
    else:
        hint = "check fs.inotify.max_user_watches and fs.inotify.max_user_instances"
    return OSError(
        err, f"{call}{where}: {text} (errno {err}); {hint}; until then intake polls incoming/"
    )


def _not_regular(mode: int) -> str:
    if stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    else:
        kind = "a special file"
    return f"is {kind}, not a regular file; drop a YAML file"


def _unreadable(op: str, exc: OSError) -> str:
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    return f"cannot {op}: {exc.strerror}; make it readable by the daemon's user ({user})"


def _log_environment(exc: OSError, subject: str) -> None:
    log.error(
        "%s: intake stopped at %s: %s (errno %s); the file stays where it is and is retried "
        "at the next rescan — free space or fix permissions on the spool",
        subject,
        exc.filename2 or exc.filename or "the spool",  # link, rename: the target is at stake
        exc.strerror,
        exc.errno,
    )


def _claim_name(run_id: str, name: str) -> str:
    prefix = run_id + CLAIM_SEP
    return prefix + _fit(name, len(prefix))


def _fit(name: str, extra: int) -> str:
    """`name`, cut so that `extra` more bytes still fit in a file name (NAME_MAX)."""
    raw = os.fsencode(name)
    if len(raw) + extra <= NAME_MAX:
        return name
    return os.fsdecode(raw[: NAME_MAX - extra])


def _json_safe(name: str) -> str:
    """A file name as valid UTF-8 (undecodable bytes become U+FFFD) for JSON."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _show(text: str) -> str:
    """Text for one log line: control characters (a newline in a file name) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in _json_safe(text))
