"""Schedules at run time: which schedules are loaded, their fires made into runs.

Owns: the schedules the daemon holds (each one's spec and bytes, and the runs of it not
finished yet), turning due fires into runs by the overlap rules, releasing a held fire once
its run is queued (one `overlap: queue` holds, once its schedule's run ends), ending a run
a crash left half made for a fire its schedule let go, and removing an `at` schedule once
its fire is handled. Not here: fire times, misfires and the held/last-fire state on disk
(chute.scheduling.schedules), the overlap rule itself (chute.scheduling.schedules.overlap_decision,
pure), making a run (chute.engine.runs).
Crash safety: a fire is recorded and held (state/schedules.json) before its run is made
under an id derived from (schedule, fire time), and let go once that run is queued, so a
crash in between finishes that same run at the next start (`_start_held`), whatever newer
fire times are due by then: no second run, none left half made (a run made but not queued
is queued then, never removed; if its schedule went or changed its trigger meanwhile, it
ends cancelled, saying why). An `at` schedule's file is removed only
after its fire is recorded, so a crash in between removes it at the next start.
Diagnostics: a fire whose run cannot be made (a full disk) is one ERROR line and stays
held: its run is made once the spool is writable (newer fires of its schedule wait for
it); a schedule file that cannot be loaded is one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chute.clock import Clock, rfc3339
from chute.engine import reasons, runs
from chute.engine.loop import Engine
from chute.engine.recovery import end_unqueued, finished_on_disk
from chute.engine.runs import ActiveRun
from chute.faults import crash_point
from chute.intake import access
from chute.observe.metrics import Metrics
from chute.scheduling.schedules import Fire, Schedules, fire_run_id, overlap_decision
from chute.spec import SpecError, load_bytes
from chute.spec.model import Pipeline
from chute.store import atomic, queue
from chute.store.spool import Spool

log = logging.getLogger(__name__)

SCHEDULED = ("cron", "every", "at")  # trigger types of runs a schedule fired


@dataclass(slots=True)
class _Loaded:
    pipeline: Pipeline
    raw: bytes
    active: set[str] = field(default_factory=set)  # run ids of this schedule not finished


class Fires:
    """The schedules the daemon holds, and the runs their fires become."""

    def __init__(
        self,
        spool: Spool,
        *,
        clock: Clock,
        engine: Engine,
        metrics: Metrics,
        node: Callable[[], tuple[int, int]],
        write_trouble: Callable[[], OSError | None],
    ) -> None:
        """`node()`: the node's CPUs and memory (a spec is checked against them);
        `write_trouble()`: why the spool cannot be written now, or None (fires then wait)."""
        self.spool = spool
        self.clock = clock
        self.engine = engine
        self.metrics = metrics
        self.node = node
        self.write_trouble = write_trouble
        self.table = Schedules(spool.state)
        self.misfires = 0  # fires that got no run of their own (chute_schedule_misfires_total)
        self._loaded: dict[str, _Loaded] = {}

    def __len__(self) -> int:
        return len(self._loaded)

    # -- what is scheduled ---------------------------------------------------------------

    def load(self) -> None:
        """At start: every schedule file; one that fails (whatever the reason) is skipped
        with one line, and the rest load."""
        cpus, memory = self.node()
        for path in sorted(self.spool.schedules.glob("*.yaml")):
            try:
                raw = path.read_bytes()
                pipeline = load_bytes(
                    raw, f"schedules/{path.name}", node_cpus=cpus, node_memory=memory
                )
                if pipeline.schedule is None:
                    continue
                accepted = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                self.set(path.stem, pipeline, raw, accepted)
            except (OSError, SpecError) as exc:
                log.error("schedules/%s cannot be loaded: %s; skipping it", path.name, exc)
            except Exception:
                log.exception("schedules/%s cannot be loaded (a chute bug); skipping it", path.name)
        try:
            forgotten = self.table.retain(list(self._loaded))
        except OSError as exc:
            log.error("%s: cannot forget gone schedules: %s", exc.filename, exc.strerror)
            forgotten = []
        if forgotten:
            log.info("forgot state of schedules whose files are gone: %s", ", ".join(forgotten))
        self._end_dropped_fires()
        self._remove_spent()  # fired before a crash that came before their removal

    def set(self, name: str, pipeline: Pipeline, raw: bytes, accepted_at: datetime) -> None:
        """Add or replace schedule `name` (intake accepted its file)."""
        assert pipeline.schedule is not None
        old = self._loaded.get(name)
        self._loaded[name] = _Loaded(pipeline, raw, active=old.active if old else set())
        self.table.set(name, pipeline.schedule, accepted_at)
        self._end_dropped_fires()
        nxt = self.table.next_fire(name, self.clock.now())
        log.info(
            "schedule %s %s next=%s",
            name,
            "replaced" if old else "added",
            nxt.isoformat() if nxt else "never",
        )

    def remove(self, name: str) -> None:
        if self._loaded.pop(name, None) is not None:
            self.table.remove(name)
            log.info("schedule %s removed", name)
            self._end_dropped_fires()

    def _end_dropped_fires(self) -> None:
        """A held fire whose schedule went (or changed its trigger) is not run: a run that a
        crash (or a full disk) left made but not queued for it ends cancelled, saying why,
        instead of staying queued for ever."""
        for name, fire_time in self.table.take_dropped():
            run_id = fire_run_id(name, fire_time)
            reason = (
                f"schedule {name} was removed or changed before the run of its fire at "
                f"{rfc3339(fire_time.timestamp())} was queued"
            )
            try:
                ended = end_unqueued(
                    self.spool, run_id, f"schedules/{name}.yaml", reason, self.clock.time()
                )
            except OSError as exc:
                log.error("%s: cannot end it (%s): %s", run_id, exc.strerror, reason)
                continue
            if ended:
                self.metrics.run_finished("cancelled", None)
                log.warning("%s cancelled: %s", run_id, reason)

    def sync_with_folder(self) -> None:
        """schedules/ is the truth: a file deleted while events were missed unschedules."""
        present = {p.stem for p in self.spool.schedules.glob("*.yaml")}
        for name in list(self._loaded):
            if name not in present:
                self.remove(name)

    def track(self, run: ActiveRun) -> None:
        """A run recovery resumed: if a schedule fired it, it is that schedule's active run."""
        trig = run.record.get("trigger")
        if isinstance(trig, dict) and trig.get("type") in SCHEDULED:
            st = self._loaded.get(Path(str(trig.get("source", ""))).stem)
            if st is not None:
                st.active.add(run.run_id)

    def run_ended(self, run_id: str) -> None:
        """A run ended: a fire held behind it may start now."""
        for name, st in self._loaded.items():
            if run_id in st.active:
                st.active.discard(run_id)
                self._start_held(name, st)  # when it cannot, fire() tries again

    # -- firing ----------------------------------------------------------------------------

    def next_wakeup(self, now: datetime) -> datetime | None:
        return self.table.next_wakeup(now)

    def fire(self) -> None:
        """Make the runs of the fires due now, by each schedule's overlap rule, and record
        each fire and each skipped one."""
        if not self._loaded or self.write_trouble() is not None:
            return  # fires wait (within grace they run late; past it misfire rules apply)
        if self.table.unsaved:
            self.table.save()
        for name, st in self._loaded.items():
            self._start_held(name, st)
        due = self.table.due(self.clock.now())
        for name, fire_time in due.skipped:
            log.warning("schedule %s misfired at %s: skipped (misfire: skip)", name, fire_time)
            self.table.record(name, fire_time)
            self._count_misfires(due.misfired[name])
        for fire in due.fires:
            loaded = self._loaded.get(fire.name)
            if loaded is None:
                continue
            st = loaded
            sched = st.pipeline.schedule
            assert sched is not None
            held = self.table.held(fire.name) is not None
            decision = overlap_decision(sched.overlap, bool(st.active), held)
            if decision == "run" and held:
                continue  # the held fire's run could not be made yet: this one waits for it
            if decision == "run":
                # Handover: the fire is recorded and held before its run is made, and let go
                # once that run is queued: after a crash in between the same fire's run is
                # finished (_start_held), whatever newer fire times are due by then.
                self.table.hold(fire)
                if self._start_fire(st, fire):
                    self.table.release(fire.name)
            elif decision == "queue":
                self.table.hold(fire)
                log.info(
                    "schedule %s fire %s queued behind its running run", fire.name, fire.fire_time
                )
            else:
                log.info(
                    "schedule %s fire %s skipped: previous run still running",
                    fire.name,
                    fire.fire_time,
                )
            self.metrics.schedules_fired(1, 0)  # counted once: when recorded
            self.table.record(fire.name, fire.fire_time)
            self._count_misfires(due.misfired[fire.name])
        if due.fires or due.skipped:
            self._remove_spent()

    def held_report(self) -> list[dict[str, Any]]:
        """Held fires (by `overlap: queue`, or whose run is not queued yet), for
        status.json."""
        out: list[dict[str, Any]] = []
        for name, st in sorted(self._loaded.items()):
            fire = self.table.held(name)
            if fire is not None:
                out.append(
                    {
                        "schedule": name,
                        "for": reasons.HELD,
                        "fire_time": rfc3339(fire.fire_time),
                        "run_id": fire.run_id(),
                        "behind": sorted(st.active),
                    }
                )
        return out

    def _remove_spent(self) -> None:
        """An `at` schedule that fired (or was skipped) leaves schedules/: it would only be
        listed as `next: never`. Its fire is recorded first, so a crash before the unlink
        just removes it at the next start (the state says it fired)."""
        for name in self.table.spent():
            crash_point("schedules.spent")  # the fire is recorded; the file is still there
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spool.schedules / f"{name}.yaml")
            atomic.fsync_dir(self.spool.schedules)
            self.remove(name)
            log.info(
                "schedule %s done: its `at` fire is past; removed schedules/%s.yaml", name, name
            )

    def _count_misfires(self, n: int) -> None:
        """Count a recorded fire's misfires (an unrecorded one is offered again, and counted
        then)."""
        self.misfires += n
        self.metrics.schedules_fired(0, n)

    def _start_held(self, name: str, st: _Loaded) -> None:
        """Start the fire held for `name`: one overlap: queue keeps until the previous run has
        ended, or one whose run a crash (or a full disk) interrupted while it was made
        (with overlap: allow at once, else once the schedule's runs have ended). One whose
        run exists already (a crash came before its release) is only released, so the next
        fire can be held in its place."""
        fire = self.table.held(name)
        if fire is None:
            return
        sched = st.pipeline.schedule
        free = not st.active or (sched is not None and sched.overlap == "allow")
        if self._fire_made(fire.run_id()) or (free and self._start_fire(st, fire)):
            self.table.release(name)

    def _fire_made(self, run_id: str) -> bool:
        """Whether a fire's run was made already: waiting or running (its queue file), or
        run to the end since."""
        return queue.exists(self.spool, run_id) or finished_on_disk(self.spool.runs / run_id)

    def _start_fire(self, st: _Loaded, fire: Fire) -> bool:
        """Make the fire's run; False when the spool cannot be written (retried later)."""
        run_id = fire.run_id()
        if self._fire_made(run_id):
            return True  # made before a crash: resumed by recovery, or run since
        try:
            self._make_run(st, fire, run_id)
        except OSError as exc:
            # Nothing is removed: a run folder made so far is finished by the next try.
            log.error(
                "schedule %s fire %s: cannot make its run (%s); retrying when the spool is "
                "writable",
                fire.name,
                fire.fire_time,
                exc,
            )
            return False
        except (SpecError, runs.Unrecoverable, ValueError) as exc:
            log.error(
                "schedule %s fire %s: its run %s was half made before a stop and cannot be "
                "finished (%s); this fire is not run",
                fire.name,
                fire.fire_time,
                run_id,
                exc,
            )
        return True

    def _make_run(self, st: _Loaded, fire: Fire, run_id: str) -> None:
        if os.path.lexists(self.spool.runs / run_id / "run.json"):
            # Made before a crash (run.json) but not queued: queue that run, never a second.
            cpus, memory = self.node()
            made = runs.queue_made(self.spool, run_id, st.raw, node_cpus=cpus, node_memory=memory)
            if made is not None:
                st.active.add(run_id)
                self.engine.add(made)
            return
        new = runs.new_run(
            st.pipeline,
            st.raw,
            trigger={
                "type": fire.trigger,
                "source": f"schedules/{fire.name}.yaml",
                "fire_time": rfc3339(fire.fire_time),
            },
            now=self.clock.now(),
            # The schedule's submitter's run, so they may cancel it (unknown: the daemon's).
            submitted_by=access.schedule_submitter(self.spool, fire.name),
            run_date=fire.run_date,
            run_id=run_id,
        )
        run = runs.make_run(self.spool, new)  # a folder without run.json is made again
        # Crash point: the fire's run exists (run.json queued), not its queue file; the fire
        # is recorded and held: the next start queues this run (_start_held).
        crash_point("schedules.run_made")
        queue.make(self.spool, run_id, st.raw)
        st.active.add(run_id)
        self.engine.add(run)
        extra = f" (standing for {fire.missed} missed)" if fire.missed else ""
        log.info(
            "%s fired schedule %s for %s%s", run_id, fire.name, fire.fire_time.isoformat(), extra
        )
