"""Admission: which dropped files the daemon takes next, and handing accepted runs on.

Owns: the names waiting in incoming/ to be taken (from inotify hints and rescans), the
batches they are taken in, backpressure (how much accepted, unfinished work the daemon
holds), and the handover of a batch's accepted runs to the engine once their folders are
durable. Not here: taking one file (chute.intake.drops), what becomes of a schedule file
(chute.daemon.fires), the loop's timing (chute.daemon.service).
Crash safety: a run starts only after its folder and queue file are durable (the writer
thread syncs a big batch; the loop syncs a small one itself), and intake's claim is
released only then (chute.intake.drops's crash points).
Limits: a batch holds at most INTAKE_BATCH files and INTAKE_BYTES of them (one file at
least): one group commit each, and the loop gets back to its tasks between batches. A spec
over INLINE_BYTES is parsed on a thread of its own (parsing takes time in proportion to
its size: on the loop it would hold up the watchdog, deadlines and signals), then decided
on the loop; its claim is durable meanwhile, so a crash only has the next start decide it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable

from chute.engine.loop import Engine
from chute.engine.runs import active_run
from chute.intake.decision import Accepted, Claimed, Outcome, Scheduled
from chute.intake.drops import Handover, Intake
from chute.intake.rejections import Rejected
from chute.observe.metrics import Metrics
from chute.spec import SpecError
from chute.spec.fields import MAX_RUN_TASKS
from chute.spec.model import Pipeline
from chute.store.spool import Spool

log = logging.getLogger(__name__)

INTAKE_BATCH = 64  # files taken per batch: one group commit, then tasks get their turn
INTAKE_BYTES = 64 << 10  # and so many bytes of them: validating takes time per byte
INLINE_BYTES = 64 << 10  # a spec bigger than this is parsed on the parser thread
# Backpressure: past either bound new files wait, durable, in incoming/ until runs finish;
# memory stays bounded whatever a flood drops at once. A run's memory grows with its tasks,
# and a task's once it has started (its manifest entry), so both are bounded. Near
# MAX_ACTIVE_TASKS a batch takes no more files than runs of MAX_RUN_TASKS would fill, so a
# batch overshoots it by one run's tasks at most.
MAX_ACTIVE_RUNS = 5000
MAX_ACTIVE_TASKS = 100_000
SYNC_HERE = 4
"""Runs accepted in one batch that the loop syncs itself (a sync each) rather than queue them
behind the writer's batch in progress, which holds other runs' final writes: a single drop
starts without that wait, while a burst's big batches still sync beside the loop. Specs
over INLINE_BYTES in all are synced by the writer too: an fsync of a megabyte can take
seconds on a busy disk, and the loop must keep its watchdog and deadlines meanwhile."""


class Admission:
    """Names to take, in arrival order; batches of them through intake; runs to the engine."""

    def __init__(
        self,
        spool: Spool,
        intake: Intake,
        engine: Engine,
        metrics: Metrics,
        *,
        post: Callable[[Callable[[], None]], None],
        on_scheduled: Callable[[Scheduled], None],
    ) -> None:
        """`post(fn)`: run `fn` on the loop's thread (the writer thread's handovers come back
        this way); `on_scheduled`: a schedule file was accepted."""
        self.spool = spool
        self.intake = intake
        self.engine = engine
        self.metrics = metrics
        self._post = post
        self._on_scheduled = on_scheduled
        self._pending: dict[str, None] = {}  # names in incoming/ to take, in arrival order
        self._in_flight = 0  # runs accepted whose handover is not back from the writer yet
        self._in_flight_tasks = 0  # their tasks (Pipeline.tasks)
        self._parsing = 0  # claims whose spec the parser thread has
        self._parser: _Parser | None = None
        self.closed = False  # stopping: durable runs wait in queue/ for the next start

    @property
    def waiting(self) -> bool:
        """Names are waiting and there is room to take some."""
        return bool(self._pending) and self.room() > 0

    def hint(self, names: Iterable[str]) -> None:
        """These names may be ready in incoming/ (an inotify event, a scan)."""
        self._pending.update(dict.fromkeys(names))

    def rescan(self) -> None:
        """inotify events are hints, the folder is the truth (Postfix pickup): finish what
        a failed handover left, and take every name incoming/ holds."""
        for outcome in self.intake.redo_claims():
            self.take(outcome)
        self.hint(self.intake.incoming_names())

    def room(self) -> int:
        """How many files the next batch may take: 0 while the daemon holds MAX_ACTIVE_RUNS
        runs or MAX_ACTIVE_TASKS tasks (accepted ones not handed over yet included)."""
        runs = MAX_ACTIVE_RUNS - len(self.engine.runs) - self._in_flight - self._parsing
        tasks = MAX_ACTIVE_TASKS - self.engine.tasks_held - self._in_flight_tasks
        if runs <= 0 or tasks <= 0:
            return 0
        return min(INTAKE_BATCH, runs, max(1, tasks // MAX_RUN_TASKS))

    def take_batch(self) -> None:
        """Take at most INTAKE_BATCH pending names, and files of at most INTAKE_BYTES (one
        file at least), in one group commit; accepted runs start once they are durable."""
        room = self.room()
        if not self._pending or room <= 0:
            return
        batch: list[str] = []
        size = 0
        for name in itertools.islice(self._pending, room):
            if batch and size >= INTAKE_BYTES:
                break
            batch.append(name)
            with contextlib.suppress(OSError):  # gone, or not a file: intake says so
                size += os.lstat(self.spool.incoming / name).st_size
        for name in batch:
            del self._pending[name]
        claimed = self.intake.claim_many(batch)
        inline = [c for c in claimed if c.size <= INLINE_BYTES]
        for c in claimed:
            if c.size > INLINE_BYTES:
                self._parse_elsewhere(c)
        if inline:
            self._decide(inline)

    def _parse_elsewhere(self, claimed: Claimed) -> None:
        if self._parser is None:
            self._parser = _Parser(self.intake.parse)
        self._parsing += 1

        def parsed(result: Pipeline | SpecError | None) -> None:  # on the parser thread
            self._post(lambda: self._parsed(claimed, result))

        self._parser.submit(claimed, parsed)

    def _parsed(self, claimed: Claimed, result: Pipeline | SpecError | None) -> None:
        self._parsing -= 1
        if not self.closed:  # else its claim waits, durable, for the next start to decide
            self._decide([claimed], {} if result is None else {claimed.claim.name: result})

    def _decide(
        self, claimed: list[Claimed], parsed: dict[str, Pipeline | SpecError] | None = None
    ) -> None:
        outcomes, handover = self.intake.decide_many(claimed, parsed)
        for outcome in outcomes:
            if not isinstance(outcome, Accepted):
                self.take(outcome)  # accepted runs start once their folders are durable
        if handover is None:
            return
        self._in_flight += len(handover.accepted)
        self._in_flight_tasks += sum(a.pipeline.tasks for a in handover.accepted)
        if len(handover.accepted) <= SYNC_HERE and sum(c.size for c in claimed) <= INLINE_BYTES:
            try:
                handover.unsynced.sync()
            except OSError as exc:
                log.warning("syncing new runs failed (%s); the writer thread retries", exc)
            else:
                self.handed(handover)
                return
        # In the writer thread once durable, in order with the engine's writes: back to
        # the loop's thread.
        self.engine.sync_then(handover.unsynced, lambda: self._post(lambda: self.handed(handover)))

    def close(self) -> None:
        """No more runs start; the parser thread ends (a spec it was parsing is decided at
        the next start, from its durable claim)."""
        self.closed = True
        if self._parser is not None:
            self._parser.close()
            self._parser = None

    def handed(self, handover: Handover) -> None:
        """`handover`'s run folders and queue links are durable: its claims go, its runs
        start (once `closed`, they wait in queue/ for the next start)."""
        self._in_flight -= len(handover.accepted)
        self._in_flight_tasks -= sum(a.pipeline.tasks for a in handover.accepted)
        self.intake.release(handover)
        if not self.closed:
            for accepted in handover.accepted:
                self.take(accepted)

    def take(self, outcome: Outcome) -> None:
        """What intake decided for one file: a run to start, a schedule, a rejection."""
        if isinstance(outcome, Scheduled):
            self.metrics.file_accepted()
        if isinstance(outcome, Accepted):
            self.metrics.file_accepted(outcome.dropped_at, outcome.accepted_at.timestamp())
            run = active_run(
                self.spool,
                outcome.record,
                outcome.pipeline,
                accepted=outcome.accepted_at.timestamp(),
            )
            self.engine.add(run)
        elif isinstance(outcome, Scheduled):
            self._on_scheduled(outcome)
        elif isinstance(outcome, Rejected):
            self.metrics.file_rejected(outcome.reason)  # intake logged it


class _Parser:
    """A thread that parses big specs one after another, off the loop: pure work (it reads
    no file and writes none), handed back through `done` callbacks it calls on its thread."""

    def __init__(self, parse: Callable[[bytes, str], Pipeline | SpecError]) -> None:
        self._parse = parse
        self._queue: queue.SimpleQueue[
            tuple[Claimed, Callable[[Pipeline | SpecError | None], None]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="chute-parse", daemon=True)
        self._thread.start()

    def submit(self, claimed: Claimed, done: Callable[[Pipeline | SpecError | None], None]) -> None:
        self._queue.put((claimed, done))

    def close(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            claimed, done = item
            try:
                result: Pipeline | SpecError | None = self._parse(
                    claimed.inspection.data, claimed.name
                )
            except Exception:  # a chute bug: the loop parses it again itself, and reports it
                log.exception("incoming/%s: parsing failed (a chute bug)", claimed.name)
                result = None
            done(result)
