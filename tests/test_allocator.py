"""chute.scheduling.allocator: placement, queue order, memory, the three policies, and starvation.

Pure tests: the clock is a float the test advances; topologies are built in place.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chute.scheduling.allocator import (
    POLICIES,
    WAIT_REASONS,
    Grant,
    Request,
    allocate,
    fits_node,
    queue_key,
    reservation,
)
from chute.scheduling.topology import Topology


def req(
    key: str,
    cpus: int = 1,
    *,
    memory: int = 0,
    priority: int = 0,
    accepted: float = 0.0,
    order: int = 0,
    walltime: float | None = None,
) -> Request:
    return Request(key, cpus, memory, priority, accepted, order, walltime)


def grant(
    key: str,
    cores: Sequence[int],
    *,
    memory: int = 0,
    started: float = 0.0,
    walltime: float | None = None,
) -> Grant:
    return Grant(key, tuple(cores), memory, started, walltime)


def topo(*sizes: int, memory: int = 1 << 40) -> Topology:
    """Nodes of the given sizes, cores numbered on from node 0."""
    nodes, first = [], 0
    for size in sizes:
        nodes.append(tuple(range(first, first + size)))
        first += size
    return Topology(nodes=tuple(nodes), memory=memory)


def started(starts: list[tuple[Request, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(r.key, cores) for r, cores in starts]


# Placement -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "sizes", "busy", "cpus", "cores"),
    [
        ("fifo-first-fit", (4, 4), (), 2, (0, 1)),
        ("fifo-first-fit", (4, 4), (0, 1, 2), 2, (4, 5)),
        ("fifo-first-fit", (4, 4), (1, 3), 2, (0, 2)),
        ("fifo-first-fit", (4, 4), (4, 5), 2, (0, 1)),
        ("best-fit", (4, 4), (4, 5), 2, (6, 7)),
        ("best-fit", (4, 4), (), 2, (0, 1)),
        ("best-fit", (4, 4, 4), (0, 1, 8, 9), 2, (2, 3)),
        ("fifo-first-fit", (4, 4), (0, 4, 5, 6), 4, (1, 2, 3, 7)),
        ("best-fit", (4, 4), (0, 4, 5, 6), 4, (1, 2, 3, 7)),
        ("fifo-first-fit", (4, 4, 4), (0, 1, 5, 10, 11), 5, (4, 6, 7, 2, 3)),
        ("fifo-first-fit", (4, 4), (), 8, tuple(range(8))),
        ("backfill", (4, 4), (0, 1, 2), 2, (4, 5)),
        ("fifo-first-fit", (4, 0, 4), (0, 1, 2), 2, (4, 5)),
    ],
    ids=[
        "lowest-cores-of-lowest-node",
        "one-node-rather-than-spread",
        "lowest-free-cores-not-contiguous",
        "first-fit-takes-lowest-node-that-fits",
        "best-fit-takes-node-with-least-left",
        "best-fit-tie-goes-to-lower-node",
        "best-fit-tie-of-three-nodes",
        "spill-starts-with-fullest-free-node",
        "best-fit-spills-the-same-way",
        "spill-over-three-nodes-most-free-first",
        "whole-machine",
        "backfill-places-like-first-fit",
        "empty-node-is-skipped",
    ],
)
def test_placement_rule(
    policy: str, sizes: tuple[int, ...], busy: tuple[int, ...], cpus: int, cores: tuple[int, ...]
) -> None:
    running = [grant("busy", busy)] if busy else []
    starts = allocate([req("a", cpus)], running, topo(*sizes), policy, now=0.0)
    assert started(starts) == [("a", tuple(sorted(cores)))]


def test_full_node_starts_nothing() -> None:
    starts = allocate([req("a")], [grant("busy", range(4))], topo(4), "fifo-first-fit", now=0.0)
    assert starts == []


def test_cores_of_a_grant_outside_the_topology_are_ignored() -> None:
    # After a reload that shrank `cpus`, a running task may hold cores no longer usable.
    running = [grant("old", (0, 99))]
    starts = allocate([req("a", 3)], running, topo(4), "fifo-first-fit", now=0.0)
    assert started(starts) == [("a", (1, 2, 3))]


# Queue order -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue", "first_two"),
    [
        (
            [req("low", priority=0), req("high", priority=5), req("mid", priority=1)],
            ["high", "mid"],
        ),
        (
            [req("late", accepted=9.0), req("early", accepted=1.0), req("mid", accepted=5.0)],
            ["early", "mid"],
        ),
        ([req("c", order=2), req("a", order=0), req("b", order=1)], ["a", "b"]),
        (
            [
                req("old-low", accepted=0.0),
                req("new-high", priority=1, accepted=99.0),
                req("old-low-2", accepted=1.0),
            ],
            ["new-high", "old-low"],
        ),
        (
            [
                req("x", accepted=1.0, order=1),
                req("y", accepted=1.0, order=0),
                req("z", accepted=0.5, order=7),
            ],
            ["z", "y"],
        ),
    ],
    ids=[
        "priority-first",
        "then-accepted",
        "then-order",
        "priority-beats-age",
        "accepted-beats-order",
    ],
)
def test_queue_order_is_priority_then_accepted_then_order(
    queue: list[Request], first_two: list[str]
) -> None:
    for policy in POLICIES:
        starts = allocate(queue, [], topo(2), policy, now=0.0)
        assert [r.key for r, _ in starts] == first_two, policy
    assert [r.key for r in sorted(queue, key=queue_key)][:2] == first_two


def test_starts_come_in_queue_order_with_the_lowest_cores_to_the_first() -> None:
    queue = [req("b", 2, order=1), req("a", 2, order=0), req("c", 1, order=2)]
    assert started(allocate(queue, [], topo(8), "fifo-first-fit", now=0.0)) == [
        ("a", (0, 1)),
        ("b", (2, 3)),
        ("c", (4,)),
    ]


# Memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy"), POLICIES, ids=POLICIES)
def test_memory_admits_only_what_fits_beside_running_grants(policy: str) -> None:
    topology = topo(8, memory=10)
    running = [grant("r", (0,), memory=6, walltime=5.0)]
    queue = [
        req("too-big", memory=5, order=0, walltime=1.0),
        req("fits", memory=4, order=1, walltime=1.0),
        req("no-memory", memory=0, order=2, walltime=1.0),
        req("now-too-big", memory=1, order=3, walltime=1.0),
    ]
    keys = [r.key for r, _ in allocate(queue, running, topology, policy, now=0.0)]
    assert keys == ["fits", "no-memory"]


def test_memory_zero_starts_even_when_memory_is_all_granted() -> None:
    running = [grant("r", (0,), memory=10)]
    starts = allocate([req("a", memory=0)], running, topo(2, memory=10), "best-fit", now=0.0)
    assert started(starts) == [("a", (1,))]


# Requests the node can never hold --------------------------------------------------------


@pytest.mark.parametrize(("policy"), POLICIES, ids=POLICIES)
def test_request_larger_than_the_node_never_starts_and_blocks_nothing(policy: str) -> None:
    topology = topo(4, 4, memory=100)
    queue = [
        req("too-many-cpus", 9, order=0, walltime=1.0),
        req("too-much-memory", 1, memory=101, order=1, walltime=1.0),
        req("small", 2, order=2, walltime=1.0),
    ]
    assert not fits_node(queue[0], topology)
    assert not fits_node(queue[1], topology)
    running = [grant("r", (0,), started=0.0, walltime=10.0)]
    assert started(allocate(queue, running, topology, policy, now=0.0)) == [("small", (1, 2))]


def test_unknown_policy_lists_the_policies() -> None:
    message = "policy: 'fifo' is not one of fifo-first-fit, best-fit, backfill"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        allocate([], [], topo(1), "fifo", now=0.0)


@pytest.mark.parametrize(
    ("cpus", "memory", "walltime", "message"),
    [
        (0, 0, None, "t: cpus 0 is not 1 or more"),
        (1, -1, None, "t: memory -1 is negative"),
        (1, 0, -1.0, "t: walltime -1.0 is negative"),
    ],
    ids=["no-cpus", "negative-memory", "negative-walltime"],
)
def test_request_refuses_impossible_values(
    cpus: int, memory: int, walltime: float | None, message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Request("t", cpus, memory, 0, 0.0, 0, walltime)


# Best-fit against first-fit --------------------------------------------------------------


def test_best_fit_keeps_a_node_whole_where_first_fit_splits_the_next_task() -> None:
    topology = topo(4, 4)
    running = [grant("r", (4, 5))]
    queue = [req("pair", 2, order=0), req("quad", 4, order=1)]
    first = dict(started(allocate(queue, running, topology, "fifo-first-fit", now=0.0)))
    best = dict(started(allocate(queue, running, topology, "best-fit", now=0.0)))
    assert first == {"pair": (0, 1), "quad": (2, 3, 6, 7)}
    assert best == {"pair": (6, 7), "quad": (0, 1, 2, 3)}
    assert {topology.node_of(c) for c in first["quad"]} == {0, 1}
    assert {topology.node_of(c) for c in best["quad"]} == {0}


# Backfill --------------------------------------------------------------------------------


def test_backfill_starts_a_task_that_ends_before_the_heads_reservation() -> None:
    running = [grant("r", range(6), started=0.0, walltime=10.0)]
    queue = [req("head", 8, order=0), req("short", 2, order=1, walltime=10.0)]
    starts = allocate(queue, running, topo(8), "backfill", now=0.0)
    assert started(starts) == [("short", (6, 7))]


def test_backfill_keeps_a_long_task_off_the_cores_the_head_will_need() -> None:
    running = [grant("r", range(6), started=0.0, walltime=10.0)]
    head = req("head", 7, order=0)
    assert reservation(head, running, topo(8), now=0.0).cores == tuple(range(7))
    queue = [head, req("long-2", 2, order=1, walltime=11.0), req("long-1", 1, order=2)]
    starts = allocate(queue, running, topo(8), "backfill", now=0.0)
    assert started(starts) == [("long-1", (7,))]


def test_backfill_without_walltime_never_takes_shadow_cores() -> None:
    running = [grant("r", range(6), started=0.0, walltime=10.0)]
    queue = [req("head", 8, order=0), req("forever", 1, order=1, walltime=None)]
    assert allocate(queue, running, topo(8), "backfill", now=0.0) == []


def test_backfill_long_task_may_use_only_memory_the_head_leaves() -> None:
    topology = topo(8, memory=100)
    running = [grant("r", range(4), memory=50, started=0.0, walltime=10.0)]
    head = req("head", 6, memory=70, order=0)
    assert reservation(head, running, topology, now=0.0).spare_memory == 30
    queue = [
        head,
        req("long-hungry", 1, memory=31, order=1, walltime=50.0),
        req("long-modest", 1, memory=30, order=2, walltime=50.0),
        req("short-hungry", 1, memory=50, order=3, walltime=10.0),
    ]
    keys = [r.key for r, _ in allocate(queue, running, topology, "backfill", now=0.0)]
    assert keys == ["long-modest"]


def test_backfill_head_behind_a_grant_without_walltime_holds_every_free_core() -> None:
    running = [grant("forever", range(4), walltime=None)]
    head = req("head", 6, order=0)
    shadow = reservation(head, running, topo(8), now=0.0)
    assert shadow.start == math.inf
    assert shadow.cores == (4, 5, 6, 7)
    queue = [head, req("short", 1, order=1, walltime=0.5)]
    assert allocate(queue, running, topo(8), "backfill", now=0.0) == []


def test_backfill_starts_in_queue_order_until_the_head_blocks_then_fills_around_it() -> None:
    queue = [
        req("a", 3, order=0, walltime=5.0),
        req("b", 6, order=1, walltime=5.0),
        req("c", 2, order=2, walltime=5.0),
        req("d", 2, order=3, walltime=6.0),
    ]
    starts = allocate(queue, [], topo(8), "backfill", now=0.0)
    # b reserves cores 0-5 at t=5: c ends by then, d runs on the cores b leaves.
    assert started(starts) == [("a", (0, 1, 2)), ("c", (3, 4)), ("d", (6, 7))]


def test_reservation_counts_an_overdue_grant_as_ending_now() -> None:
    running = [grant("late", range(4), started=0.0, walltime=5.0)]
    assert reservation(req("head", 8), running, topo(8), now=20.0).start == 20.0


# Why a task waits ------------------------------------------------------------------------


def reasons(
    queue: list[Request], running: list[Grant], topology: Topology, policy: str
) -> dict[str, str]:
    why: dict[str, str] = {}
    starts = allocate(queue, running, topology, policy, now=0.0, why=why)
    assert not {r.key for r, _ in starts} & set(why), "a started task has no reason to wait"
    return why


MiB = 1 << 20


@pytest.mark.parametrize("policy", POLICIES)
def test_a_task_waiting_for_memory_says_memory_not_cpus(policy: str) -> None:
    """Two 600 MiB jobs on 2 cpus and 1 GiB: the second waits for memory."""
    topology = topo(2, memory=1024 * MiB)
    running = [grant("first", (0,), memory=600 * MiB, walltime=60.0)]
    queue = [req("second", memory=600 * MiB, walltime=60.0)]
    assert reasons(queue, running, topology, policy) == {"second": "memory"}


@pytest.mark.parametrize("policy", POLICIES)
def test_what_was_short_at_its_turn_is_the_reason_even_if_others_took_the_rest(
    policy: str,
) -> None:
    topology = topo(4, memory=100)
    running = [grant("r", (0,), memory=60, walltime=10.0)]
    queue = [
        req("hungry", 1, memory=50, order=0, walltime=5.0),
        req("small", 3, order=1, walltime=5.0),
        req("wide", 4, order=2, walltime=5.0),
        req("huge", 1, memory=101, order=3),
    ]
    why = reasons(queue, running, topology, policy)
    assert why == {"hungry": "memory", "wide": "cpus", "huge": "node"}


def test_backfill_says_which_task_waits_for_the_heads_reservation() -> None:
    running = [grant("r", range(6), started=0.0, walltime=10.0)]
    queue = [
        req("head", 7, order=0),
        req("long", 2, order=1, walltime=11.0),
        req("short", 1, order=2, walltime=10.0),
        req("wide", 3, order=3, walltime=1.0),
    ]
    why = reasons(queue, running, topo(8), "backfill")
    # Core 7 is the only one the head leaves: long would also hold one the head needs at
    # t=10; short ends by then and starts; no core is left for wide.
    assert why == {"head": "cpus", "long": "backfill", "wide": "cpus"}


@settings(max_examples=400, deadline=None)
@given(situations=st.deferred(lambda: situations()))
def test_why_changes_no_decision_and_names_every_task_left_waiting(
    situations: tuple[Topology, list[Grant], list[Request], str, float],
) -> None:
    topology, running, queue, policy, now = situations
    why: dict[str, str] = {}
    explained = allocate(queue, running, topology, policy, now, why=why)
    assert explained == allocate(queue, running, topology, policy, now)
    started_keys = {r.key for r, _ in explained}
    assert set(why) == {r.key for r in queue} - started_keys
    assert set(why.values()) <= set(WAIT_REASONS)
    for r in queue:
        assert (why.get(r.key) == "node") == (not fits_node(r, topology))
    if policy != "backfill":
        assert "backfill" not in why.values()


# Starvation: an event-driven simulation with a fake clock ---------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float
    request: Request
    duration: float


def simulate(
    topology: Topology,
    policy: str,
    arrivals: list[Arrival],
    running: list[tuple[Grant, float]],
    horizon: float,
) -> dict[str, float]:
    """Start times by key; `running` are grants with their end times at t=0."""
    clock = 0.0
    pending = sorted(arrivals, key=lambda a: a.at)
    durations = {a.request.key: a.duration for a in arrivals}
    ends: list[tuple[float, str]] = [(end, g.key) for g, end in running]
    heapq.heapify(ends)
    grants = {g.key: g for g, _ in running}
    queue: dict[str, Request] = {}
    starts: dict[str, float] = {}
    i = 0
    while clock <= horizon:
        while ends and ends[0][0] <= clock:
            grants.pop(heapq.heappop(ends)[1])
        while i < len(pending) and pending[i].at <= clock:
            queue[pending[i].request.key] = pending[i].request
            i += 1
        for request, cores in allocate(
            list(queue.values()), list(grants.values()), topology, policy, now=clock
        ):
            del queue[request.key]
            grants[request.key] = Grant(request.key, cores, request.memory, clock, request.walltime)
            heapq.heappush(ends, (clock + durations[request.key], request.key))
            starts[request.key] = clock
        upcoming = [
            t
            for t in (ends[0][0] if ends else None, pending[i].at if i < len(pending) else None)
            if t is not None
        ]
        if not upcoming:
            break
        clock = min(upcoming)
    return starts


def stream_behind_a_big_task(
    small_duration: float, horizon: float
) -> tuple[list[Arrival], list[tuple[Grant, float]]]:
    """A full 64-core node whose 1-cpu tasks end one a second; a 64-cpu task waits at the
    head; a 1-cpu task arrives every second, each as long as the node's tasks."""
    running = [
        (grant(f"r{k}", (k - 1,), started=k - 64.0, walltime=64.0), float(k)) for k in range(1, 65)
    ]
    arrivals = [Arrival(0.25, req("big", 64, accepted=0.25, walltime=100.0), 100.0)]
    arrivals += [
        Arrival(k + 0.5, req(f"s{k}", 1, accepted=k + 0.5, walltime=small_duration), small_duration)
        for k in range(int(horizon))
    ]
    return arrivals, running


def test_first_fit_starves_a_big_task_behind_a_stream_of_small_ones() -> None:
    arrivals, running = stream_behind_a_big_task(small_duration=64.0, horizon=2000.0)
    starts = simulate(topo(64), "fifo-first-fit", arrivals, running, horizon=2000.0)
    assert "big" not in starts
    assert len(starts) > 1900


def test_backfill_starts_the_big_task_when_the_running_walltimes_expire() -> None:
    arrivals, running = stream_behind_a_big_task(small_duration=64.0, horizon=2000.0)
    starts = simulate(topo(64), "backfill", arrivals, running, horizon=2000.0)
    assert starts["big"] == 64.0
    assert all(t >= 164.0 for key, t in starts.items() if key != "big")


def test_backfill_lets_short_tasks_run_while_the_big_task_waits() -> None:
    arrivals, running = stream_behind_a_big_task(small_duration=0.25, horizon=200.0)
    starts = simulate(topo(64), "backfill", arrivals, running, horizon=200.0)
    assert starts["big"] == 64.0
    assert starts["s0"] == 1.0
    assert all(starts[f"s{k}"] == k + 0.5 for k in range(1, 64))
    assert starts["s64"] == 164.0


# Properties ------------------------------------------------------------------------------


@st.composite
def situations(draw: st.DrawFn) -> tuple[Topology, list[Grant], list[Request], str, float]:
    sizes = draw(st.lists(st.integers(0, 8), min_size=1, max_size=4))
    if sum(sizes) == 0:
        sizes[0] = 1
    topology = topo(*sizes, memory=draw(st.integers(0, 100)))
    owner = draw(
        st.lists(st.integers(-1, 4), min_size=len(topology.cpus), max_size=len(topology.cpus))
    )
    now = draw(st.floats(0, 50))
    walltimes = st.none() | st.floats(0, 40)
    running = [
        Grant(
            f"g{n}",
            tuple(c for c, o in zip(topology.cpus, owner, strict=True) if o == n),
            draw(st.integers(0, 30)),
            draw(st.floats(0, 50)),
            draw(walltimes),
        )
        for n in range(5)
        if n in owner
    ]
    queue = [
        Request(
            f"q{n}",
            draw(st.integers(1, 12)),
            draw(st.integers(0, 40)),
            draw(st.integers(0, 2)),
            draw(st.floats(0, 5)),
            n,
            draw(walltimes),
        )
        for n in range(draw(st.integers(0, 12)))
    ]
    return topology, running, queue, draw(st.sampled_from(POLICIES)), now


@settings(max_examples=400, deadline=None)
@given(situations())
def test_no_core_is_granted_twice_and_every_start_fits(
    situation: tuple[Topology, list[Grant], list[Request], str, float],
) -> None:
    topology, running, queue, policy, now = situation
    starts = allocate(queue, running, topology, policy, now)
    keys = [r.key for r, _ in starts]
    assert len(keys) == len(set(keys))
    assert set(keys) <= {r.key for r in queue}
    free = [set(cores) - {c for g in running for c in g.cores} for cores in topology.nodes]
    free_memory = topology.memory - sum(g.memory for g in running)
    for request, cores in starts:
        assert len(cores) == request.cpus
        assert list(cores) == sorted(set(cores))
        assert set(cores) <= set().union(*free), "core busy or granted twice"
        # (A backfilled task may not use the head's cores, so it can spill where one node
        # had room: the rule holds for the other policies only.)
        if policy != "backfill" and any(len(node) >= request.cpus for node in free):
            assert len({topology.node_of(c) for c in cores}) == 1, "one node had room"
        free = [node - set(cores) for node in free]
        free_memory -= request.memory
        assert free_memory >= 0
    left = sum(map(len, free))
    if policy != "backfill":
        # Work-conserving: what did not start does not fit in what is left.
        for request in queue:
            if request.key not in keys:
                assert request.cpus > left or request.memory > free_memory


@settings(max_examples=400, deadline=None)
@given(situations())
def test_backfill_never_delays_the_heads_reservation(
    situation: tuple[Topology, list[Grant], list[Request], str, float],
) -> None:
    topology, running, queue, _, now = situation
    starts = allocate(queue, running, topology, "backfill", now)
    keys = {r.key for r, _ in starts}
    ordered = sorted((r for r in queue if fits_node(r, topology)), key=queue_key)
    waiting = [n for n, r in enumerate(ordered) if r.key not in keys]
    if not waiting:
        return
    head = ordered[waiting[0]]
    as_grants = {r.key: Grant(r.key, c, r.memory, now, r.walltime) for r, c in starts}
    before = [as_grants[r.key] for r in ordered[: waiting[0]]]
    assert len(before) == waiting[0], "everything ahead of the head started"
    promised = reservation(head, [*running, *before], topology, now).start
    assert reservation(head, [*running, *as_grants.values()], topology, now).start <= promised


def obvious_allocate(
    queue: list[Request], running: list[Grant], topology: Topology, policy: str, now: float
) -> list[tuple[Request, tuple[int, ...]]]:
    """The module docstring's rules, written the slow and obvious way, as an oracle."""
    busy = {c for g in running for c in g.cores}
    free = [[c for c in node if c not in busy] for node in topology.nodes]
    memory = topology.memory - sum(g.memory for g in running)

    def place(nodes: list[list[int]], cpus: int, best: bool) -> tuple[int, ...] | None:
        fitting = [n for n in range(len(nodes)) if len(nodes[n]) >= cpus]
        if fitting:
            n = min(fitting, key=lambda n: (len(nodes[n]), n)) if best else fitting[0]
            return tuple(nodes[n][:cpus])
        if sum(map(len, nodes)) < cpus:
            return None
        taken: list[int] = []
        for n in sorted(range(len(nodes)), key=lambda n: (-len(nodes[n]), n)):
            taken += nodes[n][: cpus - len(taken)]
        return tuple(sorted(taken))

    starts: list[tuple[Request, tuple[int, ...]]] = []
    ordered = sorted((r for r in queue if fits_node(r, topology)), key=queue_key)
    head: Request | None = None
    shadow = None
    for request in ordered:
        if head is None:
            cores = place(free, request.cpus, policy == "best-fit")
            if cores is None or request.memory > memory:
                if policy != "backfill":
                    continue
                head = request
                grants = [Grant(r.key, c, r.memory, now, r.walltime) for r, c in starts]
                shadow = reservation(head, [*running, *grants], topology, now)
                spare = shadow.spare_memory
                continue
        else:
            assert shadow is not None
            if request.memory > memory:
                continue
            w = request.walltime
            if w is not None and shadow.start < math.inf and now + w <= shadow.start:
                cores = place(free, request.cpus, False)
            elif request.memory <= spare:
                outside = [[c for c in node if c not in shadow.cores] for node in free]
                cores = place(outside, request.cpus, False)
                if cores is not None:
                    spare -= request.memory
            else:
                cores = None
            if cores is None:
                continue
        free = [[c for c in node if c not in cores] for node in free]
        memory -= request.memory
        starts.append((request, cores))
    return starts


@settings(max_examples=400, deadline=None)
@given(situations())
def test_allocate_agrees_with_the_obvious_reading_of_the_rules(
    situation: tuple[Topology, list[Grant], list[Request], str, float],
) -> None:
    topology, running, queue, policy, now = situation
    assert allocate(queue, running, topology, policy, now) == obvious_allocate(
        queue, running, topology, policy, now
    )
