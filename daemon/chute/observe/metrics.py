"""The daemon's Prometheus metrics: one registry, every series chute exports.

Owns: a private CollectorRegistry (never the global one: tests and embedders may hold several
daemons' worth of metrics in one process), the counters and histograms the loop and the
engine bump as things happen, and the gauges that mirror engine state. Not here: serving
them (chute.observe.http), deciding anything (the daemon, chute.engine).
Threads: counters and histograms are bumped on the loop (and prometheus_client locks them);
the HTTP thread only collects. Gauges that mirror the engine are read from a Snapshot, an
immutable value the loop publishes once a second (Daemon._write_status), so a scrape never
iterates a dict the loop is changing. Every metric lives in the daemon process: no
prometheus_client multiprocess mode (it leaves files behind and drops features).
Labels: bounded by construction. `reason` is one of the rejection words (intake's, and
bad_request or not_owner for a control request) or, on chute_tasks_waiting, one of
chute.engine.reasons.TASK_REASONS; `state` one of the final run states, `numa_node` a
node id of this machine. No run id, file name or pipeline label (a pipeline label would
grow with every name users invent).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chute.engine.reasons import TASK_REASONS

REJECT_REASONS = (
    "invalid",
    "not_yaml",
    "too_large",
    "not_regular",
    "symlink",
    "world_writable",
    "not_submitter",
    "not_owner",
    "unreadable",
    "unknown",
    "bad_request",
)
RUN_STATES = ("succeeded", "failed", "cancelled", "interrupted")
"""chute.store.rundir.FINAL_RUN_STATES: a `stopped` run has not finished; it counts once it has."""


def ladder(low: float, high: float) -> tuple[float, ...]:
    """Histogram bounds from `low` to `high` (powers of ten), ten a decade: 1, 1.25, 1.5, 2,
    2.5, 3, 4, 5, 6, 8. Each bound is at most 4/3 of the one before, so a quantile that
    histogram_quantile interpolates inside a bucket is within a third of the truth however
    the samples fall in it, and usually far closer."""
    steps = ("1", "1.25", "1.5", "2", "2.5", "3", "4", "5", "6", "8")
    first, last = round(math.log10(low)), round(math.log10(high))
    bounds = [float(f"{m}e{k}") for k in range(first, last) for m in steps]
    return (*bounds, float(f"1e{last}"))


# From a hundredth of a second to a day: what people put in jobs, from `true` to a nightly
# build. Each histogram has no labels, so its buckets are all its series (about 60 each).
RUN_BUCKETS = ladder(0.01, 100_000)
STAGE_BUCKETS = RUN_BUCKETS
INTAKE_BUCKETS = ladder(0.0001, 100)  # drop to accepted: a tenth of a millisecond to minutes
QUEUE_BUCKETS = ladder(0.001, 100_000)  # accepted to started: none to a day of backlog


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Engine state as the loop saw it last; replaced whole, never changed."""

    queue_depth: int = 0  # runs accepted and not started
    tasks_running: int = 0
    tasks_waiting: tuple[tuple[str, int], ...] = ()  # ready tasks waiting, by reason
    cpus_total: tuple[int, ...] = ()  # by NUMA node id
    cpus_allocated: tuple[int, ...] = ()  # by NUMA node id


class _EngineGauges(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self._metrics.snapshot
        for name, doc, value in (
            ("chute_queue_depth", "Runs accepted and not started.", snap.queue_depth),
            ("chute_tasks_running", "Tasks running now.", snap.tasks_running),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        waiting = GaugeMetricFamily(
            "chute_tasks_waiting",
            "Ready tasks not started, by what they wait for (cpus, memory, backfill, node, "
            "disk, stopping).",
            labels=["reason"],
        )
        counts = dict(snap.tasks_waiting)
        for reason in TASK_REASONS:
            waiting.add_metric([reason], counts.get(reason, 0))
        yield waiting
        # Not chute_cpus_total: `_total` is reserved for counters and
        # `promtool check metrics` rejects a gauge named so.
        total = GaugeMetricFamily(
            "chute_cpus", "CPUs chute may use, by NUMA node.", labels=["numa_node"]
        )
        allocated = GaugeMetricFamily(
            "chute_cpus_allocated",
            "CPUs held by running tasks, by NUMA node.",
            labels=["numa_node"],
        )
        for node, count in enumerate(snap.cpus_total):
            total.add_metric([str(node)], count)
            used = snap.cpus_allocated[node] if node < len(snap.cpus_allocated) else 0
            allocated.add_metric([str(node)], used)
        yield total
        yield allocated


disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series: nobody queries them, they double the count


class Metrics:
    """Every chute metric, in its own registry. The methods are what the daemon and the
    engine call (the engine through its EngineEvents protocol: it imports nothing here)."""

    def __init__(self, *, version: str, start_time: float) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.snapshot = Snapshot()
        r = self.registry
        self.files_accepted = Counter(
            "chute_files_accepted",
            "Dropped files accepted (one-shot runs and schedules).",
            registry=r,
        )
        self.files_rejected = Counter(
            "chute_files_rejected",
            "Dropped files and control requests moved to rejected/, by reason.",
            ["reason"],
            registry=r,
        )
        self.runs_finished = Counter(
            "chute_runs_finished", "Runs that ended, by final state.", ["state"], registry=r
        )
        self.run_duration = Histogram(
            "chute_run_duration_seconds",
            "Run duration, first start to end.",
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "chute_stage_duration_seconds",
            "Stage duration, first start to end (cached stages excluded).",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.intake_latency = Histogram(
            "chute_intake_latency_seconds",
            "From a file's drop into incoming/ to its run's acceptance.",
            buckets=INTAKE_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "chute_queue_wait_seconds",
            "From a run's acceptance to its first task start (waiting for CPUs, memory, ...).",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.schedule_fires = Counter(
            "chute_schedule_fires", "Schedule fires handed to the overlap rule.", registry=r
        )
        self.schedule_misfires = Counter(
            "chute_schedule_misfires",
            "Schedule fire times later than their grace (run_once or skip).",
            registry=r,
        )
        self.retries = Counter(
            "chute_retries", "Failed task attempts that will be tried again.", registry=r
        )
        self.cache_hits = Counter("chute_cache_hits", "Stages answered from the cache.", registry=r)
        self.inotify_overflows = Counter(
            "chute_inotify_overflows",
            "inotify queue overflows on incoming/ (each triggers a rescan).",
            registry=r,
        )
        self.spool_write_errors = Counter(
            "chute_spool_write_errors",
            "Failed group commits to the spool seen by the loop (ENOSPC, EIO, EACCES).",
            registry=r,
        )
        self.spool_write_failing = Gauge(
            "chute_spool_write_failing",
            "1 while the spool cannot be written (the daemon starts nothing new), else 0.",
            registry=r,
        )
        Gauge(
            "chute_build_info",
            "Always 1; the labels say which chute and Python run.",
            ["version", "python"],
            registry=r,
        ).labels(version, platform.python_version()).set(1)
        Gauge(
            "chute_start_time_seconds", "When the daemon started, in epoch seconds.", registry=r
        ).set(start_time)
        r.register(_EngineGauges(self))
        ProcessCollector(registry=r)  # process_*: memory, CPU seconds, open fds, start time
        for reason in REJECT_REASONS:
            self.files_rejected.labels(reason)
        for state in RUN_STATES:
            self.runs_finished.labels(state)

    # -- the daemon ------------------------------------------------------------------------

    def publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot  # one reference assignment: a scrape sees old or new

    def file_accepted(self, dropped_at: float | None = None, accepted_at: float = 0.0) -> None:
        """A file was taken (a run or a schedule); a run's file with its drop and acceptance
        times (epoch seconds) for the intake latency."""
        self.files_accepted.inc()
        if dropped_at is not None:
            self.intake_latency.observe(max(0.0, accepted_at - dropped_at))

    def file_rejected(self, reason: str) -> None:
        self.files_rejected.labels(reason).inc()

    def run_finished(self, state: str, duration: float | None) -> None:
        self.runs_finished.labels(state).inc()
        if duration is not None:
            self.run_duration.observe(max(0.0, duration))

    def schedules_fired(self, fires: int, misfires: int) -> None:
        if fires:
            self.schedule_fires.inc(fires)
        if misfires:
            self.schedule_misfires.inc(misfires)

    def inotify_overflowed(self) -> None:
        self.inotify_overflows.inc()

    def spool_writes(self, failing: bool, newly: bool) -> None:
        """Whether the spool can be written now; `newly`: a new error since the last turn."""
        self.spool_write_failing.set(1 if failing else 0)
        if newly:
            self.spool_write_errors.inc()

    # -- the engine (chute.engine.loop.EngineEvents) ---------------------------------------

    def run_started(self, accepted: float, wall: float) -> None:
        self.queue_wait.observe(max(0.0, wall - accepted))

    def stage_finished(self, seconds: float) -> None:
        self.stage_duration.observe(max(0.0, seconds))

    def retry_scheduled(self) -> None:
        self.retries.inc()

    def cache_hit(self) -> None:
        self.cache_hits.inc()
