"""Work the daemon does when runs leave it time: report.html pages, and retention passes.

Owns: the finished runs whose report.html is still to be drawn and when it is drawn; when
retention runs and what it remembers between passes. Not here: drawing a page
(chute.observe.report), what retention removes (chute.store.retention; it keeps the runs
the daemon holds and those a waiting retry request names, chute.intake.control), ending
what dead `chute run`s left (chute.execution.leftovers).
Crash safety: a page is a derived file; a run whose page a crash lost simply has none
(`chute show` draws its text timeline from run.json and manifest.json anyway). Retention's
own steps are crash-safe (chute.store.retention).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

from chute.config import Config
from chute.engine.loop import Engine
from chute.execution import leftovers
from chute.intake import control
from chute.observe import report
from chute.store import retention
from chute.store.spool import Spool

log = logging.getLogger(__name__)

REPORT_DELAY = 5.0  # while runs are active, a report.html waits up to this long (seconds)
REPORT_BUDGET = 0.02  # seconds of report pages per turn while the loop is otherwise idle
GC_INTERVAL = 60.0
GC_FIRST = 5.0  # seconds after start of the first pass
GC_BATCH = 50  # folders and files removed per retention pass: deleting thousands stalls runs
GC_AGAIN = 5.0  # seconds to the next pass when GC_BATCH cut one short: a backlog drains


class Reports:
    """report.html of finished runs, drawn when nothing else waits: at once when no run is
    active, else once the oldest has waited REPORT_DELAY (a page is pure Python and three
    files: a burst of runs finishes first, its pages follow). Not in a thread: there it
    would hold the GIL while every system call of the loop waits for it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._due: deque[tuple[float, Path]] = deque()  # (run ended, monotonic; run dir)

    def add(self, mono: float, run_dir: Path) -> None:
        self._due.append((mono, run_dir))

    def due(self, mono: float) -> bool:
        if not self._due or self.engine.tasks_waiting:
            return False
        return not self.engine.runs or mono - self._due[0][0] >= REPORT_DELAY

    def next_due(self) -> float | None:
        """When the oldest page is due even while runs are active (monotonic), or None."""
        return self._due[0][0] + REPORT_DELAY if self._due else None

    def turn(self, mono: float, idle: bool) -> float | None:
        """The loop's turn: pages for REPORT_BUDGET when some are due and the loop is `idle`
        (not stopping, no files waiting). The seconds until pages are due (0: more are
        due now), or None."""
        if idle and self.due(mono):
            self.write(budget=REPORT_BUDGET)
            return 0.0 if self.due(mono) else None
        at = self.next_due()
        return None if at is None else at - mono

    def write(self, budget: float) -> None:
        """Draw pages for at most `budget` seconds."""
        deadline = time.monotonic() + budget
        while self._due and time.monotonic() < deadline:
            report.write_report_or_log(self._due.popleft()[1])


class Retention:
    """The daemon's retention passes: every GC_INTERVAL, sooner while a backlog drains or
    after a reload changed the rules."""

    def __init__(self, spool: Spool, engine: Engine) -> None:
        self.spool = spool
        self.engine = engine
        self.changed = False  # a reload changed the rules: a pass at once
        self._swept = False  # the first pass sweeps pipelines/ (chute.store.retention)
        self._cache_sizes: dict[str, tuple[int, int]] = {}  # retention's measures of cache/

    def run(self, config: Config, now: float) -> float:
        """One pass, at most GC_BATCH removals, after ending what dead `chute run`s left;
        returns the seconds until the next pass."""
        leftovers.end_dead_foreground(self.spool, config.kill_grace, budget=leftovers.SWEEP_GRACE)
        removed = retention.gc(
            self.spool,
            retention.Rules.of(config),
            now=now,
            limit=GC_BATCH,
            active=self.engine.runs.keys() | control.retried_runs(self.spool),
            sweep=not self._swept,
            sizes=self._cache_sizes,
        )
        self._swept = True
        self.changed = False
        if removed or removed.links:
            log.info(
                "retention removed %d run folder(s), %d pipeline link(s), %d rejected file(s), "
                "%d cache entr%s%s",
                len(removed.runs),
                len(removed.links),
                len(removed.rejected),
                len(removed.cache),
                "y" if len(removed.cache) == 1 else "ies",
                "; more to remove" if removed.more else "",
            )
        return GC_AGAIN if removed.more else GC_INTERVAL
