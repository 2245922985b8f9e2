"""What a claimed drop becomes: a run to make, a schedule, or a rejection.

Owns: the outcomes of a drop (Accepted, Scheduled, and Rejected from
chute.intake.rejections), the rules that choose one (a refusal from the inspection, a name
without a spec suffix, an invalid spec, a schedule of the same name that is someone else's),
the run.json record of an accepted file, and schedules/<name>.yaml with its owner record
(state/owners/, chute.intake.access). Not here: claiming files and making run folders in a
batch (chute.intake.drops), judging the file (chute.intake.inspection), parsing and
validating the spec (chute.spec).
Crash safety: an accepted run is only prepared here (RunToMake); chute.intake.drops makes its
folder. A schedule's owner record is written before the schedule file, and the claim is
unlinked, with the unlink synced, only after it: a crash in between redoes both from the
claim, and an older claim never overwrites a newer schedule (crash point 5 in
chute.intake.drops). A rejection is chute.intake.rejections'.
Diagnostics: an added or replaced schedule is one INFO line; a rejection one WARNING line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from chute.clock import Clock, rfc3339
from chute.config import Config
from chute.engine import runs
from chute.engine.runs import submitter
from chute.intake import access
from chute.intake.filenames import NOT_YAML, file_id, is_spec_name, json_safe, show
from chute.intake.inspection import Inspection
from chute.intake.rejections import Rejected, reject_claim
from chute.spec import Issue, SpecError, load_bytes
from chute.spec.model import Pipeline
from chute.store import atomic
from chute.store.spool import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A file claimed (renamed into state/intake/, durably) and read, not decided yet."""

    run_id: str
    name: str
    claim: Path
    inspection: Inspection
    dropped_at: float | None  # epoch s the file last changed in incoming/; None: not known

    @property
    def size(self) -> int:
        return len(self.inspection.data)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A one-shot file: its run folder (state queued) and queue/<run_id>.yaml are in place."""

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


Outcome = Accepted | Scheduled | Rejected


@dataclass(frozen=True, slots=True)
class RunToMake:
    """An accepted file whose run folder is not made yet (its batch's group commit makes it)."""

    claimed: Claimed
    accepted: Accepted


@dataclass(frozen=True, slots=True)
class Decider:
    """Decides claimed files by one config and one node's size (those of the moment it was
    made: a reload applies to the next batch)."""

    spool: Spool
    config: Config
    clock: Clock
    node_cpus: int
    node_memory: int

    def load(self, data: bytes, display: str) -> Pipeline:
        """The spec in `data` (`display` names it in issues); SpecError when invalid."""
        return load_bytes(data, display, node_cpus=self.node_cpus, node_memory=self.node_memory)

    def judge(
        self, name: str, seen: Inspection, parsed: Pipeline | SpecError | None = None
    ) -> Pipeline | tuple[str, list[Issue]]:
        """The spec of a file dropped as `name`, or the reason and issues to refuse it for.
        `parsed`: its spec, parsed elsewhere (None: parse it here)."""
        display = f"incoming/{name}"
        if seen.reason is not None:
            return seen.reason, list(seen.issues)
        if not is_spec_name(name):
            return "not_yaml", [Issue(display, 0, "", NOT_YAML)]
        try:
            return self.load(seen.data, display) if parsed is None else _spec(parsed)
        except SpecError as exc:
            return "invalid", exc.issues

    def decide(
        self, claimed: Claimed, parsed: Pipeline | SpecError | None = None
    ) -> Scheduled | Rejected | RunToMake:
        """Reject, schedule, or prepare the run of a claimed file (`parsed`: as for judge).
        OSError: the environment's trouble; the claim stays for the next rescan."""
        judged = self.judge(claimed.name, claimed.inspection, parsed)
        if not isinstance(judged, Pipeline):
            return self._reject(claimed, *judged)
        if judged.schedule is not None:
            return self._schedule(claimed, judged)
        return RunToMake(claimed, self._accept(claimed, judged))

    def _accept(self, claimed: Claimed, pipeline: Pipeline) -> Accepted:
        now = self.clock.now()
        seen = claimed.inspection
        source = f"incoming/{json_safe(claimed.name)}"
        by = submitter(seen.st.st_uid)
        record = runs.new_run(
            pipeline,
            seen.data,
            trigger={"type": "drop", "source": source, "file_id": file_id(seen.st)},
            now=now,
            run_id=claimed.run_id,
            submitted_by=by,
        ).record
        return Accepted(
            claimed.run_id, pipeline, seen.data, source, by, now, claimed.dropped_at, record
        )

    def _schedule(self, claimed: Claimed, pipeline: Pipeline) -> Scheduled | Rejected:
        now = self.clock.now()
        seen = claimed.inspection
        path = self.spool.schedules / f"{pipeline.name}.yaml"
        replaced = os.path.lexists(path)
        if replaced:  # replacing a schedule ends it: the same rule as unscheduling it
            problem = access.refusal(
                seen.st.st_uid,
                access.schedule_submitter(self.spool, pipeline.name),
                self.config,
                f"replace schedule {pipeline.name}",
            )
            if problem is not None:
                issue = Issue(
                    f"incoming/{claimed.name}",
                    0,
                    "metadata.name",
                    f"{problem} (or give this file another metadata.name)",
                )
                return self._reject(claimed, "not_owner", [issue])
        # Who submitted it, before the schedule file: a crash in between redoes both.
        access.record_schedule(
            self.spool,
            pipeline.name,
            {
                "schedule": pipeline.name,
                "submitted_by": submitter(seen.st.st_uid),
                "source": f"incoming/{json_safe(claimed.name)}",
                "file_id": file_id(seen.st),
                "accepted_at": rfc3339(now),
            },
        )
        # Handover: the schedule file is the recurring definition from now on.
        atomic.write_bytes(path, seen.data)
        os.unlink(claimed.claim)
        atomic.fsync_dir(claimed.claim.parent)  # a stale claim must not overwrite a newer one
        log.info(
            "schedule %s %s source=incoming/%s",
            pipeline.name,
            "replaced" if replaced else "added",
            show(claimed.name),
        )
        return Scheduled(pipeline.name, pipeline, seen.data, path, now, replaced)

    def _reject(self, claimed: Claimed, reason: str, issues: list[Issue]) -> Rejected:
        return reject_claim(
            claimed.claim,
            self.spool.rejected,
            claimed.name,
            reason,
            issues,
            claimed.inspection.st,
            self.clock.now(),
        )


def _spec(parsed: Pipeline | SpecError) -> Pipeline:
    if isinstance(parsed, SpecError):
        raise parsed
    return parsed
