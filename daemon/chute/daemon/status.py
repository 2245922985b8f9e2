"""What the daemon says about itself: state/status.json, the gauges, systemd's STATUS line,
and whether it is well.

Owns: the document `chute status`, `chute show` and `chute run --here` read
(state/status.json), the engine gauges published to the metrics, the one-line STATUS
sent to systemd, and what /healthz answers (the loop's last turn, spool writes failing,
each new failure counted once). Not here: the metrics registry (chute.observe.metrics), why
a run waits (chute.engine.reasons), serving /healthz and its wording (chute.observe.http).
Crash safety: status.json is volatile (rewritten every second, no fsync): after a crash it
is stale until the next daemon writes it; `chute status` trusts the lock, not this file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from chute.clock import Clock, rfc3339
from chute.config import Config
from chute.engine import reasons
from chute.engine.loop import Engine
from chute.observe.http import Server, health
from chute.observe.metrics import Metrics, Snapshot
from chute.observe.notify import Notifier
from chute.scheduling.topology import Topology
from chute.store import atomic
from chute.store.spool import Spool

from .fires import Fires

log = logging.getLogger(__name__)

STATUS_WAITING = 200  # runs status.json details, in queue order (the API knows them all)
STATUS_INTERVAL = 1.0  # seconds between publishes; the loop never waits longer


class _Writer(Protocol):
    @property
    def write_error(self) -> OSError | None: ...


class Health:
    """Whether the daemon is well, for /healthz (asked on the HTTP thread): its loop turns,
    and the spool can be written. `tick(mono)` at each turn of the loop."""

    def __init__(self, clock: Clock, metrics: Metrics) -> None:
        self.clock = clock
        self.metrics = metrics
        self.last_tick = clock.monotonic()
        self._writers: tuple[_Writer, ...] = ()  # whose write failures count
        self._counted: OSError | None = None  # the write failure counted last

    def follow(self, *writers: _Writer) -> None:
        self._writers = writers

    def write_trouble(self) -> OSError | None:
        """Why the spool cannot be written now (engine or intake), or None."""
        return next((e for w in self._writers if (e := w.write_error) is not None), None)

    def tick(self, mono: float) -> None:
        self.last_tick = mono
        err = self.write_trouble()
        self.metrics.spool_writes(err is not None, err is not None and err is not self._counted)
        self._counted = err

    def answer(self) -> str | None:
        """None when well, else /healthz's reason. The loop never waits longer than
        STATUS_INTERVAL: the status duty is always one of its wake-ups."""
        mono = self.clock.monotonic()
        return health(mono, self.last_tick, STATUS_INTERVAL, self.write_trouble())


class Status:
    def __init__(
        self,
        spool: Spool,
        *,
        clock: Clock,
        started_at: float,
        engine: Engine,
        fires: Fires,
        metrics: Metrics,
        notifier: Notifier,
        config: Callable[[], Config],
        topology: Callable[[], Topology],
        http: Server | None,
    ) -> None:
        self.spool = spool
        self.clock = clock
        self.started_at = started_at
        self.engine = engine
        self.fires = fires
        self.metrics = metrics
        self.notifier = notifier
        self.config = config
        self.topology = topology
        self.http = http

    def text(self) -> str:
        """systemd's STATUS= line."""
        queued = sum(1 for r in self.engine.runs.values() if r.record["state"] == "queued")
        return (
            f"{queued} queued, {len(self.engine.runs) - queued} running, "
            f"{self.engine.cores_in_use}/{len(self.topology().cpus)} cpus"
        )

    def publish(self) -> float:
        """status.json, the gauges and the STATUS line, as they are now; returns the seconds
        until the next publish."""
        topology = self.topology()
        allocated = self.engine.cores_by_node()
        queued = sum(1 for r in self.engine.runs.values() if r.record["state"] == "queued")
        waiting = self.engine.waiting()
        now = self.clock.now()
        table = self.fires.table
        fires = [(t, n) for n in table.names() if (t := table.next_fire(n, now))]
        doc: dict[str, Any] = {
            "pid": os.getpid(),
            "started_at": rfc3339(self.started_at),
            "updated_at": rfc3339(self.clock.time()),
            "spool": str(self.spool.root),
            "policy": self.config().policy,
            "cpus": [  # cores: what `chute run --here` leaves alone
                {
                    "numa_node": i,
                    "total": len(cores),
                    "allocated": allocated.get(i, 0),
                    "cores": topology.cpulist(cores),
                }
                for i, cores in enumerate(topology.nodes)
            ],
            "memory": {"total": topology.memory, "free": waiting.free_memory},
            "runs": {"queued": queued, "running": len(self.engine.runs) - queued},
            "tasks": {
                "running": self.engine.tasks_running,
                "waiting": self.engine.tasks_waiting,
                "waiting_for": waiting.tasks,
                "retrying": waiting.retrying,
            },
            # Runs with a task not started, in queue order (chute.engine.reasons).
            "waiting": [r.full_doc() for r in waiting.runs[:STATUS_WAITING]],
            "waiting_runs": len(waiting.runs),
            "schedules": len(self.fires),
            "next_fire": None
            if not fires
            else {"schedule": min(fires)[1], "for": reasons.SCHEDULE, "at": rfc3339(min(fires)[0])},
            "held": self.fires.held_report(),
            "http": self.http.address if self.http is not None else None,
        }
        self.metrics.publish(
            Snapshot(
                queue_depth=queued,
                tasks_running=self.engine.tasks_running,
                tasks_waiting=tuple(waiting.tasks.items()),
                cpus_total=tuple(len(cores) for cores in topology.nodes),
                cpus_allocated=tuple(allocated.get(i, 0) for i in range(len(topology.nodes))),
            )
        )
        if self.http is not None:
            self.http.waiting = {r.run_id: r for r in waiting.runs}  # replaced whole
        try:
            atomic.write_volatile(self.spool.state / "status.json", atomic.dumps(doc))
        except OSError as exc:
            log.debug("status.json not written: %s", exc)  # a full disk: healthz says so
        self.notifier.status(self.text())
        return STATUS_INTERVAL
