"""What the daemon says about itself: state/status.json, the gauges, systemd's STATUS line.

Owns: the document `chute status`, `chute show` and `chute run --here` read
(state/status.json), the engine gauges published to the metrics, and the one-line STATUS
sent to systemd. Not here: the metrics registry (chute.observe.metrics), why a run waits
(chute.engine.reasons), /healthz (chute.observe.http, given the loop's tick by the service).
Crash safety: status.json is volatile (rewritten every second, no fsync): after a crash it
is stale until the next daemon writes it; `chute status` trusts the lock, not this file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from chute.clock import Clock, rfc3339
from chute.config import Config
from chute.engine import reasons
from chute.engine.loop import Engine
from chute.observe.http import Server
from chute.observe.metrics import Metrics, Snapshot
from chute.observe.notify import Notifier
from chute.scheduling.topology import Topology
from chute.store import atomic
from chute.store.spool import Spool

from .fires import Fires

log = logging.getLogger(__name__)

STATUS_WAITING = 200  # runs status.json details, in queue order (the API knows them all)


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

    def publish(self) -> None:
        """status.json, the gauges and the STATUS line, as they are now."""
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
