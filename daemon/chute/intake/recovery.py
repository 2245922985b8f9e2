"""Finishing what a crash or a failed handover left in state/intake/ and rejected/.

Owns: the claims nobody is deciding or handing over (each finished by the state its run
folder is in: crash points 2 to 5 of chute.intake.drops), the rejected drops whose
error.json a crash lost (crash point 6), the temp files interrupted atomic writes left
(crash point 7), and the claims it could not finish (left for the next start). Not here:
deciding a file (chute.intake.decision), rejected requests (chute.intake.control.repair),
runs that were running (chute.daemon.recovery).
Crash safety: each step is one of the handover's own, redone: the run id comes from the
claim's name, so a claim finishes the run folder it made before instead of making a second
run; every step is safe to redo after another crash.
Diagnostics: what it remade is one INFO or WARNING line; the environment's trouble is the
intake's ERROR line (the claim stays for the next rescan); a chute bug is a traceback, and
that claim is left alone until the next start. A claim's name intake never gives: one
WARNING line, left alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from typing import TYPE_CHECKING

from chute.clock import parse_rfc3339
from chute.intake import access
from chute.intake.decision import Accepted, Claimed, Outcome
from chute.intake.filenames import claimed_as, show
from chute.intake.inspection import Gone, NotReady
from chute.intake.rejections import report_drop, unreported
from chute.spec import Issue
from chute.spec.model import Pipeline
from chute.store import atomic, queue, rundir

if TYPE_CHECKING:
    from chute.intake.drops import Intake

log = logging.getLogger(__name__)

_REJECTED_COPY = re.compile(r"(.+\.ya?ml)\.\d+", re.IGNORECASE)


class Recovery:
    """Redoes the unfinished handovers of one Intake, whose folders and rules it uses."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake
        self._stuck: set[str] = set()  # claims a chute bug left; retried at the next start

    def at_start(self) -> list[Outcome]:
        """Remove temp leftovers, finish every claim, and report rejections a crash left
        without their error.json. Runs finished are not returned (see Intake.recover)."""
        spool = self.intake.spool
        for folder in (
            spool.queue,
            spool.schedules,
            spool.rejected,
            self.intake.claims,
            spool.state / access.FOLDER,
        ):
            removed = atomic.remove_temp_leftovers(folder)
            if removed:
                log.info("%s: removed %d temp file(s) an interrupted write left", folder, removed)
        self._stuck.clear()
        finished = self.redo_claims(announce=False)
        return [o for o in finished if not isinstance(o, Accepted)] + self._repair_rejected()

    def redo_claims(self, *, announce: bool) -> list[Outcome]:
        """Finish every claim in state/intake/ that nothing is deciding or handing over.
        `announce`: also return runs that were made but never reported (a handover that
        failed while running; at start-up the daemon finds those in queue/ itself)."""
        claims = self.intake.claims
        out: list[Outcome] = []
        try:
            entries = sorted(os.listdir(claims))
        except OSError as exc:
            self.intake.trouble(exc, str(claims))
            return out
        for entry in entries:
            if entry.startswith(".") or entry in self._stuck or self.intake.busy(entry):
                continue
            try:
                outcome = self._redo_claim(entry, announce=announce)
            except OSError as exc:
                self.intake.trouble(exc, str(claims / entry))
                continue
            except Exception:
                log.exception("%s: finishing the claim failed (a chute bug)", claims / entry)
                self._stuck.add(entry)
                continue
            if outcome is not None:
                out.append(outcome)
        return out

    def _redo_claim(self, entry: str, *, announce: bool) -> Outcome | None:
        claim = self.intake.claims / entry
        parts = claimed_as(entry)
        if parts is None:
            log.warning("%s: not a claim intake made; left alone", claim)
            self._stuck.add(entry)
            return None
        run_id, name = parts
        run_dir = self.intake.spool.runs / run_id
        try:
            record = rundir.read_json(run_dir / "run.json")
            if not isinstance(record, dict):
                raise ValueError("run.json is not a JSON object")
        except FileNotFoundError:
            record = None
        except ValueError:  # orjson.JSONDecodeError too
            # A power loss before the writer thread synced it (decide_many): the folder is
            # half made, like one without run.json (crash point 2).
            log.warning("%s: run.json of a run not yet handed over is damaged; remaking it", claim)
            shutil.rmtree(run_dir)
            record = None
        if record is not None:  # crash points 3 and 4: the run exists
            if record.get("state") != "queued":  # handed over already
                os.unlink(claim)
                return None
            spool = self.intake.spool
            try:
                data = (run_dir / "spec.yaml").read_bytes()
            except FileNotFoundError:
                data = b""
            if hashlib.sha256(data).hexdigest() != record.get("spec_sha256"):
                # Not synced before a power loss: the claim holds the bytes that were accepted.
                data = claim.read_bytes()
                atomic.write_bytes(run_dir / "spec.yaml", data)
                queue.remove(spool, run_id)  # a link to the damaged copy
                log.warning("%s recovered: spec.yaml was missing or damaged; rewrote it", run_id)
            if not queue.exists(spool, run_id):
                queue.make(spool, run_id, data)
                log.info(
                    "%s recovered: wrote %s a crash left out", run_id, queue.path(spool, run_id)
                )
            os.unlink(claim)
            if not announce:
                return None
            display = str(record["trigger"].get("source", f"incoming/{name}"))
            return Accepted(
                run_id,
                self.intake.decider().load(data, display),
                data,
                display,
                record["submitted_by"],
                parse_rfc3339(record["created_at"]),
                None,
                record,
            )
        try:  # crash point 2: decide again, with the same run id
            seen = self.intake.inspector.inspect(
                claim, f"incoming/{name}", self.intake.config, lease=False
            )
        except (Gone, NotReady) as exc:
            log.debug("%s not finished: %s", claim, exc)
            return None
        log.info("%s recovered: finishing the intake of incoming/%s", run_id, show(name))
        return self.intake.decide_now(Claimed(run_id, name, claim, seen, None))

    def _repair_rejected(self) -> list[Outcome]:
        folder = self.intake.spool.rejected
        try:
            lost = unreported(folder, _REJECTED_COPY)
        except OSError as exc:
            self.intake.trouble(exc, str(folder))
            return []
        decider = self.intake.decider()
        out: list[Outcome] = []
        for entry, name in lost:
            path = folder / entry
            try:
                seen = self.intake.inspector.inspect(
                    path, f"incoming/{name}", self.intake.config, lease=False
                )
            except (Gone, NotReady):
                continue
            judged = decider.judge(name, seen)
            if isinstance(judged, Pipeline):
                judged = (
                    "unknown",
                    [
                        Issue(
                            f"incoming/{name}",
                            0,
                            "",
                            "was rejected, but a crash lost the reason and it passes the checks "
                            "now — drop it again to submit it",
                        )
                    ],
                )
            try:
                out.append(report_drop(path, name, *judged, seen.st, self.intake.clock.now()))
            except OSError as exc:
                self.intake.trouble(exc, str(path))
        return out
