"""The units waiting for CPUs, kept in allocation order, and the few that could start now.

Owns: the waiting units of every active run in the queue order — priority
descending, then accepted time, then topological order (a stage's position in its run, then
the shard index) — and choosing which of them to hand the allocator. Not here: cores and
placement (chute.scheduling.allocator), unit states (chute.engine.stage), starting tasks
(chute.engine.loop).
Pure: no I/O and no clock.
Shape: a run's waiting units are kept per stage, in a *group* sorted by shard; every unit of
a group asks for the same cpus, memory and walltime (its stage's). Runs are kept sorted by
(priority desc, accepted); runs equal in both are merged unit by unit in topological order
(ties: by run id, which sorts by creation). So adding or removing a unit costs O(log n) plus
a move within its stage's group (at most MAX_SHARDS entries) and, when its run gets its
first or loses its last waiting unit, within the list of runs; never O(all waiting units).
Choosing: the allocator starts a request only if its cpus and memory fit in what is free
(free only shrinks within a decision), so once one unit of a group does not fit, no later
unit of it will: `candidates` walks groups in queue order, passes over the rest of such a
group, and stops (first-fit, best-fit) when the cores are all spoken for. What it returns
makes `allocator.allocate` start exactly what a walk of the whole queue would, at a cost of
the groups visited plus the units returned, not of the units waiting.
Explaining (`explain`, once a second for the status, never in a decision): each group
gets the reason the allocator gave its first unit it saw, or, if it saw none, what the
group lacks now; O(groups), whatever the units.
Limits: backfill looks at every group (its head and what may fill around it can be
anywhere), up to free // cpus + 1 units of each.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from chute.engine.stage import Unit
from chute.scheduling import allocator
from chute.spec.fields import MAX_SHARDS

R = TypeVar("R")
T = TypeVar("T")

ORDER_SPAN = 100_000
"""Request.order = a stage's position * ORDER_SPAN + the shard index (a run's topological
order in one integer)."""
assert MAX_SHARDS < ORDER_SPAN


class GroupWait(NamedTuple, Generic[R]):
    """Why one stage's waiting units wait (Waitlist.explain). A tuple: thousands are made
    each second with a long queue, and a frozen dataclass costs ~3x as much to make."""

    run_id: str
    owner: R
    rank: int  # the run's place among the runs with waiting units, 1 = next to start
    position: int  # the stage's place in its run's topological order
    units: int
    cpus: int  # what each unit asks for
    memory: int
    since: float  # epoch seconds
    reason: str  # one of allocator.WAIT_REASONS


def _shard(unit: Unit) -> int:
    return unit.shard or 0  # a fallback: alone in its group


@dataclass(slots=True, eq=False)
class _Group:
    """One stage's waiting units, sorted by shard; they all ask for the same."""

    position: int  # the stage's place in its run's topological order
    cpus: int
    memory: int
    walltime: float | None
    since: float  # when its first unit began to wait (epoch seconds), for `explain`
    units: list[Unit] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Run(Generic[R]):
    run_id: str  # breaks ties between runs equal in priority and accepted
    owner: R
    priority: int
    accepted: float
    groups: dict[int, _Group] = field(default_factory=dict)  # position -> group

    @property
    def rank(self) -> tuple[int, float]:
        return (-self.priority, self.accepted)


class Waitlist(Generic[R]):
    """Waiting units by run (`owner` is the caller's object for that run)."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run[R]] = {}
        self._ranked: list[_Run[R]] = []  # runs with waiting units, by _run_order
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(
        self,
        run_id: str,
        owner: R,
        *,
        priority: int,
        accepted: float,
        position: int,
        unit: Unit,
        cpus: int,
        memory: int,
        walltime: float | None,
        since: float,
    ) -> None:
        """Queue `unit`, of the stage at `position` in run `run_id`, waiting from `since`
        (epoch seconds)."""
        run = self._runs.get(run_id)
        if run is None:
            run = _Run(run_id, owner, priority, accepted)
            self._runs[run_id] = run
            _insert(self._ranked, run, _run_order)
        group = run.groups.get(position)
        if group is None:
            group = run.groups[position] = _Group(position, cpus, memory, walltime, since)
        _insert(group.units, unit, _shard)
        self._count += 1

    def remove(self, run_id: str, position: int, unit: Unit) -> bool:
        """Take `unit` off the list; False when it was not on it."""
        run = self._runs.get(run_id)
        group = None if run is None else run.groups.get(position)
        if run is None or group is None:
            return False
        units = group.units
        i = bisect.bisect_left(units, _shard(unit), key=_shard)
        while i < len(units) and _shard(units[i]) == _shard(unit):
            if units[i] is unit:
                del units[i]
                self._count -= 1
                if not units:
                    self._drop_group(run_id, run, position)
                return True
            i += 1
        return False

    def prune(self, run_id: str) -> None:
        """Drop the units of `run_id` that are no longer waiting (cancelled, skipped):
        O(its waiting units), for the rare events that end many at once."""
        run = self._runs.get(run_id)
        if run is None:
            return
        for position, group in list(run.groups.items()):
            kept = [u for u in group.units if u.state == "waiting"]
            self._count -= len(group.units) - len(kept)
            group.units = kept
            if not kept:
                self._drop_group(run_id, run, position)

    def clear(self) -> None:
        self._runs.clear()
        self._ranked.clear()
        self._count = 0

    def beyond(self, cpus: int, memory: int) -> list[str]:
        """Keys of waiting units that ask for more than `cpus` or `memory`."""
        return [
            u.key
            for run in self._ranked
            for g in run.groups.values()
            if g.cpus > cpus or g.memory > memory
            for u in g.units
        ]

    def candidates(
        self, free: int, free_memory: int, whole: int, whole_memory: int, policy: str
    ) -> list[tuple[R, Unit, allocator.Request]]:
        """The waiting units `allocator.allocate` must see to decide as it would over the
        whole queue, in queue order: `free` cores and `free_memory` are free now, of a node
        with `whole` and `whole_memory`."""
        out: list[tuple[R, Unit, allocator.Request]] = []
        backfill = policy == "backfill"
        cores, memory = free, free_memory  # what the units taken so far leave (not backfill)

        def take(run: _Run[R], group: _Group, start: int, most: int) -> int:
            """Hand over up to `most` units of `group` from `start`; how many it took."""
            nonlocal cores, memory
            if backfill:
                # At most `fit` units of a group can start, all from what is free now; one
                # more may be the head of the queue, which backfill reserves for.
                n = _fit(group, free, free_memory) + 1 - start
            else:
                n = _fit(group, cores, memory)
                cores -= group.cpus * min(n, most)
                memory -= group.memory * min(n, most)
            units = group.units[start : start + max(0, min(n, most))]
            out.extend((run.owner, u, _request(run, group, u)) for u in units)
            return len(units)

        ranked = self._ranked
        i = 0
        while i < len(ranked) and (backfill or cores > 0):
            j = i + 1
            while j < len(ranked) and ranked[j].rank == ranked[i].rank:
                j += 1
            groups = [
                (run, position, group)
                for run in ranked[i:j]
                for position, group in sorted(run.groups.items())
                if group.cpus <= whole and group.memory <= whole_memory  # else never starts
            ]
            i = j
            if len(groups) == 1 or all(run is groups[0][0] for run, _, _ in groups):
                for run, _, group in groups:  # one run: its stages' orders do not interleave
                    take(run, group, 0, len(group.units))
                    if not backfill and cores <= 0:
                        break
                continue
            # Runs tied in rank: unit by unit in topological order (ties: the run queued
            # first); a group leaves the merge at its first unit not taken.
            heap = [
                (position * ORDER_SPAN + _shard(g.units[0]), run.run_id, position, 0, run, g)
                for run, position, g in groups
            ]
            heapq.heapify(heap)
            while heap and (backfill or cores > 0):
                _, run_id, position, k, run, group = heapq.heappop(heap)
                if take(run, group, k, 1) and k + 1 < len(group.units):
                    order = position * ORDER_SPAN + _shard(group.units[k + 1])
                    heapq.heappush(heap, (order, run_id, position, k + 1, run, group))
        return out

    def explain(
        self,
        why: Mapping[str, str],
        starting: Collection[str],
        free: int,
        free_memory: int,
        whole: int,
        whole_memory: int,
    ) -> Iterator[GroupWait[R]]:
        """Why each stage's units wait, stage by stage in queue order. `why`: the reasons
        `allocator.allocate` gave for the `candidates` of this moment that it did not start,
        and `starting` the keys it would start (the engine starts them at its next step,
        unless it is paused). A stage's reason is that of its first unit the allocator saw
        and did not start; a stage it did not see waits for what it lacks now (node, cpus,
        memory), or for cpus taken by units ahead of it."""
        seen = bool(why or starting)
        for rank, run in enumerate(self._ranked, 1):
            groups = run.groups.items() if len(run.groups) == 1 else sorted(run.groups.items())
            for position, group in groups:
                reason = None
                for unit in group.units if seen else ():
                    key = unit.key
                    reason = why.get(key)
                    if reason is not None or key not in starting:
                        break
                if reason is None:
                    if group.cpus > whole or group.memory > whole_memory:
                        reason = allocator.NODE
                    elif group.cpus <= free and group.memory > free_memory:
                        reason = allocator.MEMORY
                    else:
                        reason = allocator.CPUS
                yield GroupWait(
                    run.run_id,
                    run.owner,
                    rank,
                    position,
                    len(group.units),
                    group.cpus,
                    group.memory,
                    group.since,
                    reason,
                )

    # -- internals -------------------------------------------------------------------------

    def _drop_group(self, run_id: str, run: _Run[R], position: int) -> None:
        del run.groups[position]
        if run.groups:
            return
        del self._runs[run_id]
        i = bisect.bisect_left(self._ranked, _run_order(run), key=_run_order)
        assert self._ranked[i] is run
        del self._ranked[i]


def _insert(items: list[T], item: T, key: Callable[[T], Any]) -> None:
    """insort by `key`, with the common case first: a stage's shards come in index order,
    runs in acceptance order."""
    if not items or key(items[-1]) < key(item):
        items.append(item)
    else:
        bisect.insort(items, item, key=key)


def _fit(group: _Group, cores: int, memory: int) -> int:
    """How many units of `group` fit in `cores` and `memory` at once."""
    n = cores // group.cpus
    if group.memory:
        n = min(n, memory // group.memory)
    return max(0, n)


def _request(run: _Run[R], group: _Group, unit: Unit) -> allocator.Request:
    return allocator.Request(
        key=unit.key,
        cpus=group.cpus,
        memory=group.memory,
        priority=run.priority,
        accepted=run.accepted,
        order=group.position * ORDER_SPAN + _shard(unit),
        walltime=group.walltime,
    )


def _run_order(run: _Run[R]) -> tuple[int, float, str]:
    return (-run.priority, run.accepted, run.run_id)
