"""Taking dropped files exactly once: incoming/ → state/intake/ → a run, a schedule or rejected/.

Owns: incoming/, state/intake/ (claims), claiming files in batches, making the run folders
and queue/<run_id>.yaml links of a batch's accepted files in one group commit, releasing
their claims once those are durable, and the spool's write trouble as intake sees it (for
healthz). Not here: the names it takes and a file's identity (chute.intake.filenames),
judging a file (chute.intake.inspection), what a file becomes (chute.intake.decision),
rejected/ (chute.intake.rejections), redoing what a crash left (chute.intake.recovery), the
inotify watch (chute.intake.watch), a run folder's files (chute.store.rundir), which names
to take when (chute.daemon.admission).
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
     decide_many puts the run folder and queue link in place and leaves their fsyncs to
     the caller (the writer thread); the claim is unlinked (release) only once they are
     durable, and the run starts only then. A power loss in between can leave a run.json
     that is empty or torn: that folder is half made too, and is made again.
  3. run.json in place, no queue/<id>.yaml: write it from runs/<id>/spec.yaml (the bytes
     accepted; if its sha256 is not the one run.json records, the sync was lost, and it
     is rewritten from the claim first), unlink the claim. Only while run.json still says
     queued: a run that moved on was handed over already, and its queue file may be gone
     because it finished. (A handover that failed while the daemon runs, ENOSPC say,
     leaves the same state; the next rescan finishes it and reports the run as Accepted.
     A claim whose handover is not released yet is not touched by a rescan.)
  4. queue file written, claim not yet unlinked: as 3, nothing to write.
  5. recurring: state/owners/<name>.json (who dropped it, chute.intake.access), then
     schedules/<name>.yaml written, claim not unlinked: redo writes the same record and bytes
     again (the claim's unlink is fsynced, so an older claim never overwrites a newer
     schedule).
  6. rejected: renamed to rejected/<x> but no <x>.error.json: re-validate it and write it.
  7. any atomic write interrupted: `.tmp-*` leftovers in queue/, schedules/, rejected/,
     state/intake/ and state/owners/ are removed.
Postfix's pickup is at-least-once at this step; the claim rename is what closes the window.
We decide from the bytes read through one descriptor and keep our own copy (queue/, and
runs/<id>/spec.yaml), so a writer that kept a descriptor cannot change what runs.
Diagnostics: a user's mistake → rejected/ with error.json and one WARNING line; the
environment (ENOSPC, EACCES on the spool) → one ERROR line naming the path, the errno and
what to do, once until intake writes succeed again, the file or claim kept for the next
rescan; a chute bug → log.exception, the claim kept until the next start. A file that
vanished under us: DEBUG.
Limits: not thread-safe: call it from one thread (parse() alone is pure, and the daemon
runs it on a thread of its own for a big spec).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from chute.clock import Clock
from chute.config import Config
from chute.engine import runs
from chute.intake.decision import Accepted, Claimed, Decider, Outcome, RunToMake
from chute.intake.filenames import claim_name, is_candidate, show
from chute.intake.inspection import Gone, Inspector, NotReady
from chute.intake.recovery import Recovery
from chute.spec import SpecError
from chute.spec.model import Pipeline
from chute.store import atomic, rundir
from chute.store.spool import Spool

log = logging.getLogger(__name__)


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
    """Claims dropped files, decides them in batches, and hands accepted runs over."""

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
        self.inspector = Inspector()
        self._recovery = Recovery(self)
        self._handing: set[str] = set()  # claims of runs handed over and not yet released
        self._deciding: set[str] = set()  # claims not decided yet (their spec is parsed elsewhere)
        self.write_error: OSError | None = None  # the spool could not be written (for healthz)
        self._errors = 0  # environment failures so far, to tell a clean pass

    def decider(self) -> Decider:
        """Decides files by the config and node size of now (a reload changes them)."""
        return Decider(
            self.spool,
            self.config,
            self.clock,
            node_cpus=self.node_cpus,
            node_memory=self.node_memory,
        )

    def parse(self, data: bytes, name: str) -> Pipeline | SpecError:
        """The spec a dropped file `name` holds, or why it is invalid. Pure (reads no file,
        writes nothing): a caller may run it on another thread."""
        try:
            return self.decider().load(data, f"incoming/{name}")
        except SpecError as exc:
            return exc

    def busy(self, claim: str) -> bool:
        """A claim (its name in state/intake/) is being decided or its run handed over: a
        rescan must leave it alone."""
        return claim in self._deciding or claim in self._handing

    def trouble(self, exc: OSError, subject: str) -> None:
        """An environment failure (a full disk, permissions): logged once until intake
        succeeds again (a rescan every second would repeat it for every waiting file)."""
        if self.write_error is None or self.write_error.errno != exc.errno:
            log.error(
                "%s: intake stopped at %s: %s (errno %s); the file stays where it is and is "
                "retried at the next rescan — free space or fix permissions on the spool",
                subject,
                exc.filename2 or exc.filename or "the spool",  # link, rename: the target
                exc.strerror,
                exc.errno,
            )
        else:
            log.debug("%s: still failing: %s", subject, exc)
        self.write_error = exc
        self._errors += 1

    def _clean_pass(self, errors_before: int) -> None:
        """A pass that wrote without an error says the spool takes writes again."""
        if self.write_error is not None and self._errors == errors_before:
            log.warning("intake writes to the spool succeed again")
            self.write_error = None

    # -- claim, decide, hand over ------------------------------------------------------

    def incoming_names(self) -> list[str]:
        """The candidate names in incoming/ now, sorted (the daemon takes them in batches)."""
        try:
            return sorted(n for n in os.listdir(self.spool.incoming) if is_candidate(n))
        except OSError as exc:
            self.trouble(exc, "incoming/")
            return []

    def claim_many(self, names: Iterable[str]) -> list[Claimed]:
        """Claim these names of incoming/, and make the claims durable. A file gone, not
        ready or ignored gives nothing; the environment's trouble is logged and the file
        stays where it is. Each claim must then be decided (decide_many), now or, after its
        spec was parsed elsewhere, later: until then a rescan leaves it alone."""
        claimed: list[Claimed] = []
        for name in names:
            if not is_candidate(name):
                log.debug("incoming/%s ignored: not a *.yaml or *.yml name", show(name))
                continue
            try:
                got = self._claim(name)
            except OSError as exc:
                self.trouble(exc, f"incoming/{show(name)}")
                continue
            except Exception:
                log.exception("incoming/%s: intake failed (a chute bug)", show(name))
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
            self.trouble(exc, str(self.claims))
            return []  # the claims stay; the next rescan finishes them
        self._deciding.update(c.claim.name for c in claimed)
        return claimed

    def _claim(self, name: str) -> Claimed | None:
        """Inspect incoming/<name> and claim it by a rename (not yet synced)."""
        path = self.spool.incoming / name
        display = f"incoming/{name}"
        try:
            seen = self.inspector.inspect(path, display, self.config, lease=True)
        except Gone:
            log.debug("%s gone before it was taken", show(display))
            return None
        except NotReady as exc:
            log.debug("%s not ready: %s", show(display), exc)
            return None
        run_id = rundir.new_run_id(self.clock.now())
        while os.path.lexists(self.spool.runs / run_id):  # same second, same 24 random bits
            run_id = rundir.new_run_id(self.clock.now())
        claim = self.claims / claim_name(run_id, name)
        try:
            os.rename(path, claim)
        except FileNotFoundError:
            log.debug("%s gone before it was claimed", show(display))
            return None
        dropped_at: float | None = seen.st.st_ctime
        now_st = os.lstat(claim)
        if (now_st.st_dev, now_st.st_ino) != (seen.st.st_dev, seen.st.st_ino):
            # Replaced between our read and the rename: decide what we actually claimed.
            dropped_at = None
            try:
                seen = self.inspector.inspect(claim, display, self.config, lease=False)
            except (Gone, NotReady) as exc:
                log.debug("%s replaced while taken; left for the next rescan: %s", claim, exc)
                return None
        return Claimed(run_id, name, claim, seen, dropped_at)

    def decide_many(
        self, claimed: list[Claimed], parsed: Mapping[str, Pipeline | SpecError] | None = None
    ) -> tuple[list[Outcome], Handover | None]:
        """Decide claims (claim_many) in one group commit: what each becomes, and the run
        folders and queue links of the accepted ones, in place but not yet durable: the
        Handover says what to sync before release(). The claims were synced by claim_many:
        a run is never made from an unsynced claim. A batch of N files costs about 3N + 4
        fsyncs instead of 10N. `parsed`: the spec of a claim (by its name in state/intake/),
        parsed elsewhere."""
        errors_before = self._errors
        decider = self.decider()
        decided: list[Outcome | RunToMake] = []  # in the order of `claimed`
        for c in claimed:
            self._deciding.discard(c.claim.name)
            try:
                decided.append(decider.decide(c, (parsed or {}).get(c.claim.name)))
            except OSError as exc:
                self.trouble(exc, f"incoming/{show(c.name)}")
            except Exception:
                log.exception("incoming/%s: intake failed (a chute bug)", show(c.name))
        to_make = [d for d in decided if isinstance(d, RunToMake)]
        handover: Handover | None = None
        if to_make:
            try:
                handover = self._make_runs(to_make, durable=False)
            except OSError as exc:  # the claims stay for the next rescan
                what = (
                    f"incoming/{show(to_make[0].claimed.name)}"
                    if len(to_make) == 1
                    else f"{len(to_make)} files of incoming/"
                )
                self.trouble(exc, what)
                decided = [d for d in decided if not isinstance(d, RunToMake)]
        outcomes = [d.accepted if isinstance(d, RunToMake) else d for d in decided]
        if outcomes:
            self._clean_pass(errors_before)
        return outcomes, handover

    def decide_now(self, claimed: Claimed) -> Outcome:
        """Decide one claim, and make an accepted run durable and release it at once."""
        decided = self.decider().decide(claimed)
        if not isinstance(decided, RunToMake):
            return decided
        self.release(self._make_runs([decided], durable=True))
        return decided.accepted

    def _make_runs(self, to_make: list[RunToMake], *, durable: bool) -> Handover:
        news = [
            runs.NewRun(
                r.accepted.record,
                r.accepted.pipeline,
                r.accepted.spec_bytes,
                r.accepted.accepted_at.timestamp(),
            )
            for r in to_make
        ]
        unsynced = runs.make_runs(self.spool, news, queue_files=True, durable=durable)
        # Until release(), a rescan must leave these claims alone: finishing one would hand
        # its run over a second time.
        self._handing.update(r.claimed.claim.name for r in to_make)
        return Handover([r.accepted for r in to_make], [r.claimed.claim for r in to_make], unsynced)

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
                show(accepted.source),
            )

    # -- what a crash or a failed handover left (chute.intake.recovery) -----------------

    def redo_claims(self) -> list[Outcome]:
        """Redo the claims a failed handover left (a full disk), at each rescan."""
        errors_before = self._errors
        out = self._recovery.redo_claims(announce=True)
        self._clean_pass(errors_before)
        return out

    def recover(self) -> list[Outcome]:
        """Start-up, before the first rescan: finish the handovers a crash interrupted.

        Returns the schedules and rejections it finished. Runs it finished are not returned:
        like every run accepted before the crash, each has queue/<run_id>.yaml by now, and
        the daemon starts queued runs from queue/ (returning them too would start them twice).
        """
        return self._recovery.at_start()
