"""Which waiting tasks start now, and on which cores: the allocation policies.

Owns: the order of the ready queue, the placement of a task on NUMA nodes and cores, and
the policies `fifo-first-fit` (default), `best-fit` and `backfill`. Pure: no I/O and no
clock; `now` is an argument, so the engine, the tests and tests/bench replay the same code
with a simulated clock. Not here: reading the node (chute.scheduling.topology), pinning and running
(chute.execution.runner), task states (chute.engine).
Crash safety: nothing is stored; after a restart the engine rebuilds `running` from the
grants of the tasks it resumed and asks again.
Diagnostics: a request that can never fit the node (more cpus or memory than the topology
has) is refused by the validator; here it just never starts, and never blocks the queue.
Limits: backfill trusts walltimes (the stage `timeout`, which the runner enforces); a grant
without one is assumed never to end, which makes the estimate safe but pessimistic.

Rules (docs/config.md, policy, tells them to users):
- Queue order: priority descending, then accepted time, then topological order
  (`queue_key`), sorted here; the caller's order only breaks exact ties.
- Free cores are the topology's cores in no running grant; free memory is the topology's
  memory less the running grants' memory (memory 0 asks for none).
- Placement: when one NUMA node has enough free cores the task gets cores of that node
  only — the lowest-numbered node that fits (first-fit, backfill) or the one left with the
  fewest free cores (best-fit, ties to the lower node). Otherwise it spans nodes, taking
  first from the node with the most free cores, so it touches as few nodes as possible.
  Within a node it takes the lowest-numbered free cores.
- `fifo-first-fit` and `best-fit` walk the whole queue and start every task that fits in
  what is still free; a big task can wait forever behind a stream of small ones.
- Why a task waits (`allocate(..., why=)`): what was short when its turn came in the walk
  (cpus, else memory), even if later tasks took more since; `backfill` for a task that fit
  in what was free but not beside the head's reservation; `node` for one bigger than the
  node.
- `backfill` (EASY): tasks start in queue order until the first that does not fit, the
  head. The head reserves the earliest time its cpus and memory will be free, from the
  running grants' `started + walltime`, and the cores it would get then (its shadow cores).
  A later task starts now only if it fits now and either ends by that time (its own
  walltime) or uses no shadow core and only memory the head will not need. A task without a
  walltime never starts on shadow cores; when the head's time is never (it waits on a grant
  without walltime), every free core is a shadow core. So the head's estimated start never
  moves later, and it cannot starve.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from chute.scheduling.topology import Topology

POLICIES = ("fifo-first-fit", "best-fit", "backfill")
CPUS, MEMORY, BACKFILL, NODE = "cpus", "memory", "backfill", "node"
WAIT_REASONS = (CPUS, MEMORY, BACKFILL, NODE)
"""Why a request waits (allocate's `why`): too few free cpus; enough cpus but too little
free memory; it fits, but only on cores or memory backfill holds for the head of the
queue; it asks for more than the node has (after a reload took cores or memory away)."""


@dataclass(frozen=True, slots=True)
class Request:
    """A ready task asking for cores: `walltime` is its timeout in seconds (None: no limit)."""

    key: str
    cpus: int
    memory: int
    priority: int
    accepted: float
    order: int
    walltime: float | None

    def __post_init__(self) -> None:
        if self.cpus < 1:
            raise ValueError(f"{self.key}: cpus {self.cpus} is not 1 or more")
        if self.memory < 0:
            raise ValueError(f"{self.key}: memory {self.memory} is negative")
        if self.walltime is not None and self.walltime < 0:
            raise ValueError(f"{self.key}: walltime {self.walltime} is negative")


@dataclass(frozen=True, slots=True)
class Grant:
    """A running task's cores and memory, and when it started (for backfill's estimate)."""

    key: str
    cores: tuple[int, ...]
    memory: int
    started: float
    walltime: float | None


@dataclass(frozen=True, slots=True)
class Reservation:
    """When the head of the queue can start at the latest, per walltimes, and on which cores.

    `start` is `math.inf` when it waits on a grant without walltime; then `cores` is every
    free core. `spare_memory` is what the head leaves of the memory free at `start`.
    """

    start: float
    cores: tuple[int, ...]
    spare_memory: int


def queue_key(request: Request) -> tuple[int, float, int]:
    """Sort key of the ready queue: priority descending, then accepted, then order."""
    return (-request.priority, request.accepted, request.order)


def fits_node(request: Request, topology: Topology) -> bool:
    """Whether `request` could ever start on `topology` (when nothing else runs)."""
    return request.cpus <= sum(map(len, topology.nodes)) and request.memory <= topology.memory


def allocate(
    queue: Sequence[Request],
    running: Sequence[Grant],
    topology: Topology,
    policy: str,
    now: float,
    why: dict[str, str] | None = None,
) -> list[tuple[Request, tuple[int, ...]]]:
    """The tasks of `queue` to start at `now`, in queue order, each with its sorted cores.

    `why`, when given, gets the reason each request of `queue` that does not start waits
    (WAIT_REASONS), by key: what was short when its turn came (cpus before memory), or
    `backfill` for one that fit only on cores or memory held for the head, or `node` for
    more than the node has. Without it the decision does no extra work."""
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
    free = _free_cores(topology, running)
    free_count = sum(map(len, free))
    free_memory = topology.memory - sum(g.memory for g in running)
    best = policy == "best-fit"
    # Only a request that fits in what is free before this call can start in it; the others
    # matter only as backfill's head. Sorting just the former keeps a long queue cheap. The
    # input index breaks ties, so equal keys keep the caller's order and never compare
    # Requests.
    candidates: list[tuple[tuple[int, float, int], int, Request]] = []
    first_blocked: tuple[tuple[int, float, int], int, Request] | None = None
    whole = sum(map(len, topology.nodes))
    for i, r in enumerate(queue):
        if r.cpus > whole or r.memory > topology.memory:
            if why is not None:
                why[r.key] = NODE
            continue
        entry = (queue_key(r), i, r)
        if r.cpus <= free_count and r.memory <= free_memory:
            candidates.append(entry)
            continue
        if why is not None:
            why[r.key] = CPUS if r.cpus > free_count else MEMORY
        if first_blocked is None or entry[:2] < first_blocked[:2]:
            first_blocked = entry
    candidates.sort()
    starts: list[tuple[Request, tuple[int, ...]]] = []
    for n, (key, i, request) in enumerate(candidates):
        if free_count == 0:
            break
        fits = request.cpus <= free_count and request.memory <= free_memory
        if policy == "backfill":
            head, rest = None, candidates[n + 1 :]
            if first_blocked is not None and first_blocked[:2] < (key, i):
                head, rest = first_blocked[2], candidates[n:]
            elif not fits:
                head = request
            if head is not None:
                started = [Grant(r.key, c, r.memory, now, r.walltime) for r, c in starts]
                shadow = reservation(head, [*running, *started], topology, now)
                rest_requests = [e[2] for e in rest]
                starts += _backfill(rest_requests, free, free_count, free_memory, shadow, now, why)
                if why is not None and head is request:
                    why[head.key] = CPUS if head.cpus > free_count else MEMORY
                break
        if fits:
            cores = _place(free, request.cpus, best)
            assert cores is not None  # enough free cores always place, spilling if need be
            free_count -= _take(free, cores)
            free_memory -= request.memory
            starts.append((request, cores))
        elif why is not None:
            why[request.key] = CPUS if request.cpus > free_count else MEMORY
    if why is not None:  # the rest of the walk, cut short once every core was taken
        started_keys = {r.key for r, _ in starts}
        for r in queue:
            if r.key not in started_keys:
                why.setdefault(r.key, CPUS)
    return starts


def reservation(
    head: Request, running: Sequence[Grant], topology: Topology, now: float
) -> Reservation:
    """The earliest time `head` fits as the running grants end by their walltimes.

    Grants ending at the same instant are all counted, so the head's cores are chosen from
    everything free at that time; an overdue grant counts as ending now.
    """
    free = _free_cores(topology, running)
    free_memory = topology.memory - sum(g.memory for g in running)
    ends = [
        (max(now, g.started + g.walltime), n, g)
        for n, g in enumerate(running)
        if g.walltime is not None
    ]
    heapq.heapify(ends)
    node = {core: i for i, cores in enumerate(topology.nodes) for core in cores}
    start = now
    while sum(map(len, free)) < head.cpus or free_memory < head.memory:
        if not ends:
            every_free = tuple(sorted(c for cores in _free_cores(topology, running) for c in cores))
            return Reservation(math.inf, every_free, 0)
        start = ends[0][0]
        while ends and ends[0][0] == start:
            _, _, grant = heapq.heappop(ends)
            free_memory += grant.memory
            for core in grant.cores:
                if core in node:
                    free[node[core]].append(core)
        for node_cores in free:
            node_cores.sort()
    placed = _place(free, head.cpus, best=False)
    assert placed is not None  # the loop ends only with enough free cores
    return Reservation(start, placed, free_memory - head.memory)


def _backfill(
    candidates: Sequence[Request],
    free: list[list[int]],
    free_count: int,
    free_memory: int,
    shadow: Reservation,
    now: float,
    why: dict[str, str] | None,
) -> list[tuple[Request, tuple[int, ...]]]:
    starts: list[tuple[Request, tuple[int, ...]]] = []
    reserved = set(shadow.cores)
    outside = [[c for c in cores if c not in reserved] for cores in free]
    outside_count = sum(map(len, outside))
    spare_memory = shadow.spare_memory
    for request in candidates:
        if free_count == 0:
            break
        if request.cpus > free_count or request.memory > free_memory:
            if why is not None:
                why[request.key] = CPUS if request.cpus > free_count else MEMORY
            continue
        # With the head's start at never, "ends before it" would let a stream of short
        # tasks hold its cores forever: only cores outside the shadow are open then.
        ends_in_time = (
            request.walltime is not None and now + request.walltime <= shadow.start < math.inf
        )
        if ends_in_time:
            cores = _place(free, request.cpus, best=False)
        elif request.cpus <= outside_count and request.memory <= spare_memory:
            cores = _place(outside, request.cpus, best=False)
            spare_memory -= request.memory
        else:
            if why is not None:
                why[request.key] = BACKFILL
            continue
        assert cores is not None  # enough free cores always place, spilling if need be
        free_count -= _take(free, cores)
        outside_count -= _take(outside, cores)
        free_memory -= request.memory
        starts.append((request, cores))
    return starts


def _free_cores(topology: Topology, running: Sequence[Grant]) -> list[list[int]]:
    """Free cores by node, each list sorted."""
    busy = {core for grant in running for core in grant.cores}
    return [[c for c in cores if c not in busy] for cores in topology.nodes]


def _place(free: list[list[int]], cpus: int, best: bool) -> tuple[int, ...] | None:
    """`cpus` cores from `free` (by node, sorted) by the placement rule, or None."""
    fitting = [i for i, cores in enumerate(free) if len(cores) >= cpus]
    if fitting:
        node = min(fitting, key=lambda i: (len(free[i]), i)) if best else fitting[0]
        return tuple(free[node][:cpus])
    if sum(map(len, free)) < cpus:
        return None
    taken: list[int] = []
    for i in sorted(range(len(free)), key=lambda i: (-len(free[i]), i)):
        taken.extend(free[i][: cpus - len(taken)])
        if len(taken) == cpus:
            break
    return tuple(sorted(taken))


def _take(free: list[list[int]], cores: tuple[int, ...]) -> int:
    """Remove `cores` from `free`; return how many of them were there."""
    gone = set(cores)
    removed = 0
    for i, node_cores in enumerate(free):
        if gone.intersection(node_cores):
            kept = [c for c in node_cores if c not in gone]
            removed += len(node_cores) - len(kept)
            free[i] = kept
    return removed
