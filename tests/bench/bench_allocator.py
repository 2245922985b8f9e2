"""Replay a real job log through each allocation policy with a simulated clock.

The log is the NASA Ames iPSC/860 trace (Oct-Dec 1993, 128 processors, 18,239 jobs) in the
Standard Workload Format, from the Parallel Workloads Archive. Each job becomes a Request
(cpus = processors, walltime = its run time, memory 0) on a 128-core 2-node topology; the
clock jumps from event to event (arrivals and ends), and `allocate` is called at each. The
log's submit times are the real machine's start times, so at 1x load waits are small (the
cleaned log still overlaps up to 176 processors at moments, hence a few waits); the
compressed rows (submit times divided by the factor) show the policies under pressure.
`split` is the share of tasks that fit in one NUMA node but got cores on both.

    PYTHONPATH=daemon python tests/bench/bench_allocator.py [LOAD ...]
    CHUTE_SWF=/path/to/log.swf.gz  overrides the log (gzip or plain text)
"""

from __future__ import annotations

import gzip
import heapq
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chute.scheduling.allocator import POLICIES, Grant, Request, allocate
from chute.scheduling.topology import Topology

DEFAULT_SWF = Path("/work/shared/data/NASA-iPSC-1993-3.1-cln.swf.gz")
TOPOLOGY = Topology(nodes=(tuple(range(64)), tuple(range(64, 128))), memory=1 << 40)


@dataclass(frozen=True, slots=True)
class Job:
    number: int
    submit: float
    runtime: float
    cpus: int


@dataclass(frozen=True, slots=True)
class Result:
    policy: str
    load: float
    jobs: int
    makespan: float
    mean_wait: float
    p95_wait: float
    max_wait: float
    utilisation: float
    decisions: int
    us_per_decision: float
    split: float


def read_swf(path: Path) -> tuple[list[Job], int]:
    """Jobs with a known run time and processor count; also how many lines were skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    jobs: list[Job] = []
    skipped = 0
    with opener(path, "rt") as f:
        for line in f:
            if line.startswith(";") or not line.strip():
                continue
            fields = line.split()
            number, submit, runtime, procs = (
                int(fields[0]),
                float(fields[1]),
                float(fields[3]),
                int(fields[4]),
            )
            if runtime < 0 or procs <= 0:
                skipped += 1
                continue
            jobs.append(Job(number, submit, runtime, min(procs, len(TOPOLOGY.cpus))))
    return jobs, skipped


def replay(jobs: list[Job], policy: str, load: float = 1.0) -> Result:
    arrivals = sorted(jobs, key=lambda j: (j.submit, j.number))
    submit = {j.number: j.submit / load for j in arrivals}
    requests = {
        j.number: Request(str(j.number), j.cpus, 0, 0, submit[j.number], j.number, j.runtime)
        for j in arrivals
    }
    ends: list[tuple[float, int]] = []
    running: dict[int, Grant] = {}
    queue: dict[int, Request] = {}
    waits: list[float] = []
    node_of = {core: n for n, cores in enumerate(TOPOLOGY.nodes) for core in cores}
    could_fit_one_node = split = 0
    last_end = 0.0
    decisions = 0
    spent = 0.0
    i = 0
    clock = submit[arrivals[0].number] if arrivals else 0.0
    while i < len(arrivals) or queue or ends:
        while ends and ends[0][0] <= clock:
            del running[heapq.heappop(ends)[1]]
        while i < len(arrivals) and submit[arrivals[i].number] <= clock:
            queue[arrivals[i].number] = requests[arrivals[i].number]
            i += 1
        if queue:
            t0 = time.perf_counter()
            starts = allocate(list(queue.values()), list(running.values()), TOPOLOGY, policy, clock)
            spent += time.perf_counter() - t0
            decisions += 1
            for request, cores in starts:
                number = request.order
                del queue[number]
                running[number] = Grant(request.key, cores, 0, clock, request.walltime)
                end = clock + (request.walltime or 0.0)
                heapq.heappush(ends, (end, number))
                waits.append(clock - request.accepted)
                if request.cpus <= max(map(len, TOPOLOGY.nodes)):
                    could_fit_one_node += 1
                    split += len({node_of[c] for c in cores}) > 1
                last_end = max(last_end, end)
        upcoming = [ends[0][0]] if ends else []
        if i < len(arrivals):
            upcoming.append(submit[arrivals[i].number])
        if not upcoming:
            break  # what is left in the queue can never start
        clock = min(upcoming)
    first = min(submit.values(), default=0.0)
    makespan = last_end - first
    work = sum(j.runtime * j.cpus for j in jobs)
    waits.sort()
    return Result(
        policy=policy,
        load=load,
        jobs=len(waits),
        makespan=makespan,
        mean_wait=statistics.fmean(waits) if waits else 0.0,
        p95_wait=waits[int(0.95 * (len(waits) - 1))] if waits else 0.0,
        max_wait=waits[-1] if waits else 0.0,
        utilisation=work / (len(TOPOLOGY.cpus) * makespan) if makespan else 0.0,
        decisions=decisions,
        us_per_decision=spent / decisions * 1e6 if decisions else 0.0,
        split=split / could_fit_one_node if could_fit_one_node else 0.0,
    )


def main(argv: list[str]) -> int:
    path = Path(os.environ.get("CHUTE_SWF", DEFAULT_SWF))
    loads = [float(a) for a in argv] or [1.0, 2.0]
    jobs, skipped = read_swf(path)
    print(
        f"{path.name}: {len(jobs)} jobs ({skipped} skipped), {len(TOPOLOGY.cpus)} cores "
        f"in {len(TOPOLOGY.nodes)} NUMA nodes, walltime = run time"
    )
    header = (
        f"{'policy':<15} {'load':>4} {'jobs':>6} {'makespan':>10} {'mean wait':>10} "
        f"{'p95 wait':>10} {'max wait':>10} {'util':>6} {'split':>6} {'decisions':>9} "
        f"{'µs/dec':>7}"
    )
    print(header)
    print("-" * len(header))
    for load in loads:
        for policy in POLICIES:
            r = replay(jobs, policy, load)
            print(
                f"{r.policy:<15} {r.load:>3g}x {r.jobs:>6} {r.makespan:>9.0f}s "
                f"{r.mean_wait:>9.1f}s {r.p95_wait:>9.1f}s {r.max_wait:>9.0f}s "
                f"{r.utilisation:>6.1%} {r.split:>6.1%} {r.decisions:>9} {r.us_per_decision:>7.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
