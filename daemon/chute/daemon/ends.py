"""What follows a run's end: its queue file goes, its page is due, it is counted and logged.

Owns: the handover once a run's final run.json is durable (queue/<run_id>.yaml removed, in
the writer thread), then, on the loop's thread, the run's report page queued, its count in
chute_runs_finished_total, its `finished` line, and its schedule told. Not here: ending the
run and writing run.json (chute.engine), drawing the page (chute.daemon.upkeep), what a
schedule does once its run ended (chute.daemon.fires).
Crash safety: the queue file goes only after run.json says, durably, that the run is over:
a crash in between leaves a finished run in queue/, which the next start only unqueues
(chute.daemon.recovery).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from chute.clock import Clock
from chute.engine.runs import ActiveRun
from chute.observe.metrics import Metrics
from chute.store import queue
from chute.store.spool import Spool

from .upkeep import Reports

log = logging.getLogger(__name__)


class RunEnds:
    """`durable(run)` is the engine's `on_finished`; `post(fn)` runs `fn` on the loop's
    thread; `ended(run_id)` tells the run's schedule."""

    def __init__(
        self,
        spool: Spool,
        *,
        clock: Clock,
        post: Callable[[Callable[[], None]], None],
        reports: Reports,
        metrics: Metrics,
        ended: Callable[[str], None],
    ) -> None:
        self.spool = spool
        self.clock = clock
        self._post = post
        self.reports = reports
        self.metrics = metrics
        self._ended = ended

    def durable(self, run: ActiveRun) -> None:
        """In the writer thread, once a run's final run.json is durable."""
        # Handover: run.json says the run is over (durable); the queue copy can go. Here,
        # not on the loop: a burst of runs ending would make the loop wait on each unlink.
        queue.remove(self.spool, run.run_id)
        self._post(lambda: self._on_loop(run))

    def _on_loop(self, run: ActiveRun) -> None:
        self.reports.add(self.clock.monotonic(), run.dir)
        rec = run.record
        self.metrics.run_finished(str(rec["state"]), rec.get("duration_seconds"))
        stages = " ".join(f"{s.name}={s.state}" for s in run.graph.stages.values())
        log.info(
            "%s finished state=%s duration=%ss pipeline=%s stages: %s",
            run.run_id,
            rec["state"],
            rec.get("duration_seconds"),
            run.pipeline.name,
            stages[:2000],
        )
        self._ended(run.run_id)
