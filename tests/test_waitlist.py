"""chute.engine.waitlist: queue order across runs, and candidates that decide as the whole queue.

Pure tests: units of chute.engine.stage, requests and grants of chute.scheduling.allocator, no
processes. The oracle is the queue as DESIGN.md states it: every waiting unit of every run in one
list sorted by (priority desc, accepted, topological order) — what the engine kept before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from chute.engine.stage import Unit
from chute.engine.waitlist import ORDER_SPAN, Waitlist
from chute.scheduling.allocator import POLICIES, Grant, Request, allocate, queue_key
from chute.scheduling.topology import Topology

GiB = 1 << 30


@dataclass(frozen=True)
class Shape:
    cpus: int = 1
    memory: int = 0
    walltime: float | None = None


@dataclass
class Run:
    run_id: str
    priority: int
    accepted: float
    stages: list[tuple[str, int, Shape]]  # (name, shards, shape), in topological order


def topo(*sizes: int, memory: int = 64 * GiB) -> Topology:
    nodes, first = [], 0
    for size in sizes:
        nodes.append(tuple(range(first, first + size)))
        first += size
    return Topology(nodes=tuple(nodes), memory=memory)


def units_of(run: Run) -> list[tuple[int, Unit, Shape]]:
    out = []
    for position, (name, shards, shape) in enumerate(run.stages):
        for shard in range(shards):
            unit = Unit(run.run_id, name, shard if shards > 1 else None, state="waiting")
            out.append((position, unit, shape))
    return out


def add(w: Waitlist[Run], run: Run, position: int, unit: Unit, shape: Shape) -> None:
    w.add(
        run.run_id,
        run,
        priority=run.priority,
        accepted=run.accepted,
        position=position,
        unit=unit,
        cpus=shape.cpus,
        memory=shape.memory,
        walltime=shape.walltime,
        since=run.accepted,
    )


def whole_queue(entries: list[tuple[Run, int, Unit, Shape]]) -> list[Request]:
    """Every waiting unit as a request, sorted as DESIGN.md says (ties: by run id)."""
    requests = [
        (
            Request(
                u.key,
                shape.cpus,
                shape.memory,
                run.priority,
                run.accepted,
                position * ORDER_SPAN + (u.shard or 0),
                shape.walltime,
            ),
            run.run_id,
        )
        for run, position, u, shape in entries
    ]
    requests.sort(key=lambda rs: (queue_key(rs[0]), rs[1]))
    return [r for r, _ in requests]


def decide(w: Waitlist[Run], running: list[Grant], topology: Topology, policy: str) -> list:
    busy = {c for g in running for c in g.cores}
    free = sum(1 for c in topology.cpus if c not in busy)
    free_memory = topology.memory - sum(g.memory for g in running)
    picked = w.candidates(free, free_memory, len(topology.cpus), topology.memory, policy)
    starts = allocate([r for _, _, r in picked], running, topology, policy, now=0.0)
    return [(r.key, cores) for r, cores in starts]


@st.composite
def situations(draw: st.DrawFn) -> tuple[list[Run], list[Grant], Topology, str, int]:
    shapes = st.builds(
        Shape,
        st.integers(1, 5),
        st.sampled_from([0, 0, 2 * GiB, 5 * GiB, 70 * GiB]),
        st.sampled_from([None, 10.0, 100.0]),
    )
    runs = [
        Run(
            f"r{n}",
            draw(st.sampled_from([0, 0, 5])),
            draw(st.sampled_from([1.0, 1.0, 2.0])),  # ties in acceptance are the hard part
            [
                (f"s{k}", draw(st.integers(1, 6)), draw(shapes))
                for k in range(draw(st.integers(1, 3)))
            ],
        )
        for n in range(draw(st.integers(1, 5)))
    ]
    topology = topo(*draw(st.sampled_from([(4,), (2, 2), (3, 3, 2)])), memory=8 * GiB)
    busy = draw(st.lists(st.sampled_from(topology.cpus), unique=True))
    running = [
        Grant(
            f"g{c}", (c,), draw(st.sampled_from([0, GiB])), 0.0, draw(st.sampled_from([None, 5.0]))
        )
        for c in busy
    ]
    return runs, running, topology, draw(st.sampled_from(POLICIES)), draw(st.integers(0, 2**32))


@settings(max_examples=500, deadline=None)
@given(situations())
def test_candidates_start_exactly_what_a_walk_of_the_whole_queue_starts(
    situation: tuple[list[Run], list[Grant], Topology, str, int],
) -> None:
    runs, running, topology, policy, seed = situation
    rng = random.Random(seed)
    w: Waitlist[Run] = Waitlist()
    pending = [(run, p, u, shape) for run in runs for p, u, shape in units_of(run)]
    rng.shuffle(pending)  # units become ready in any order (dependencies, retries)
    waiting = []
    for run, p, u, shape in pending:
        add(w, run, p, u, shape)
        waiting.append((run, p, u, shape))
    for entry in rng.sample(waiting, len(waiting) // 3):  # some started or were cancelled
        run, p, u, _ = entry
        assert w.remove(run.run_id, p, u)
        waiting.remove(entry)
    assert len(w) == len(waiting)
    oracle = allocate(whole_queue(waiting), running, topology, policy, now=0.0)
    assert decide(w, running, topology, policy) == [(r.key, c) for r, c in oracle]


def test_a_later_run_of_higher_priority_goes_first_then_acceptance_then_stage_and_shard() -> None:
    w: Waitlist[Run] = Waitlist()
    early = Run("early", 0, 1.0, [("a", 3, Shape()), ("b", 1, Shape())])
    late = Run("late", 0, 2.0, [("c", 2, Shape())])
    urgent = Run("urgent", 9, 3.0, [("d", 2, Shape())])
    for run in (early, late, urgent):
        for p, u, shape in reversed(units_of(run)):  # ready in reverse: order is not arrival
            add(w, run, p, u, shape)
    picked = w.candidates(100, 64 * GiB, 100, 64 * GiB, "fifo-first-fit")
    assert [r.key for _, _, r in picked] == [
        "urgent/d/0", "urgent/d/1",
        "early/a/0", "early/a/1", "early/a/2", "early/b",
        "late/c/0", "late/c/1",
    ]  # fmt: skip


def test_runs_tied_in_priority_and_acceptance_interleave_in_topological_order() -> None:
    w: Waitlist[Run] = Waitlist()
    one = Run("one", 0, 1.0, [("a", 2, Shape()), ("b", 1, Shape())])
    two = Run("two", 0, 1.0, [("a", 3, Shape())])
    for run in (one, two):
        for p, u, shape in units_of(run):
            add(w, run, p, u, shape)
    picked = w.candidates(100, 64 * GiB, 100, 64 * GiB, "fifo-first-fit")
    assert [r.key for _, _, r in picked] == [
        "one/a/0", "two/a/0", "one/a/1", "two/a/1", "two/a/2", "one/b",
    ]  # fmt: skip


def test_a_shard_back_from_a_retry_waits_in_index_order_again() -> None:
    w: Waitlist[Run] = Waitlist()
    run = Run("r", 0, 1.0, [("s", 5, Shape())])
    units = units_of(run)
    for p, u, shape in units:
        add(w, run, p, u, shape)
    for p, u, _ in units[:3]:
        assert w.remove("r", p, u)  # shards 0-2 started
    p, retried, shape = units[1]
    add(w, run, p, retried, shape)  # shard 1 failed and is due again
    picked = w.candidates(100, 64 * GiB, 100, 64 * GiB, "fifo-first-fit")
    assert [r.key for _, _, r in picked] == ["r/s/1", "r/s/3", "r/s/4"]
    assert not w.remove("r", p, units[0][1]), "shard 0 is not waiting"


def test_candidates_are_the_units_that_start_not_every_unit_waiting() -> None:
    w: Waitlist[Run] = Waitlist()
    for n in range(10):  # 50,000 waiting units that ask for 2 cores
        run = Run(f"big{n}", 0, float(n), [("s", 5000, Shape(cpus=2))])
        for p, u, shape in units_of(run):
            add(w, run, p, u, shape)
    small = Run("small", 0, 99.0, [("t", 1, Shape(cpus=1))])
    add(w, small, 0, *units_of(small)[0][1:])
    assert len(w) == 50_001
    one_free = w.candidates(1, 64 * GiB, 4, 64 * GiB, "fifo-first-fit")
    assert [r.key for _, _, r in one_free] == ["small/t"]
    three_free = w.candidates(3, 64 * GiB, 4, 64 * GiB, "best-fit")
    assert [r.key for _, _, r in three_free] == ["big0/s/0", "small/t"]


def test_prune_drops_what_left_the_waiting_state_and_keeps_the_rest() -> None:
    w: Waitlist[Run] = Waitlist()
    run = Run("r", 0, 1.0, [("s", 4, Shape()), ("t", 1, Shape())])
    units = units_of(run)
    for p, u, shape in units:
        add(w, run, p, u, shape)
    units[1][1].state = "skipped"
    units[2][1].state = "skipped"
    w.prune("r")
    assert len(w) == 3
    picked = w.candidates(100, 64 * GiB, 100, 64 * GiB, "fifo-first-fit")
    assert [r.key for _, _, r in picked] == ["r/s/0", "r/s/3", "r/t"]
    assert w.beyond(100, 64 * GiB) == []
    assert w.beyond(0, 64 * GiB) == ["r/s/0", "r/s/3", "r/t"]


def explained(
    w: Waitlist[Run], running: list[Grant], topology: Topology, policy: str
) -> list[tuple[str, int, str, int, str]]:
    """(run, rank, stage, units, reason) per waiting stage, as the engine asks each second:
    the candidates of this moment through allocate(why=), then explain."""
    busy = {c for g in running for c in g.cores}
    free = sum(1 for c in topology.cpus if c not in busy)
    free_memory = topology.memory - sum(g.memory for g in running)
    whole, whole_memory = len(topology.cpus), topology.memory
    picked = w.candidates(free, free_memory, whole, whole_memory, policy)
    why: dict[str, str] = {}
    starts = allocate([r for _, _, r in picked], running, topology, policy, 0.0, why)
    starting = {r.key for r, _ in starts}
    return [
        (g.run_id, g.rank, g.owner.stages[g.position][0], g.units, g.reason)
        for g in w.explain(why, starting, free, free_memory, whole, whole_memory)
    ]


def test_explain_says_why_each_stage_waits_in_queue_order() -> None:
    w: Waitlist[Run] = Waitlist()
    first = Run("a", 1, 0.0, [("hungry", 1, Shape(memory=8 * GiB)), ("wide", 1, Shape(cpus=4))])
    second = Run("b", 0, 0.0, [("shards", 3, Shape())])
    third = Run("c", 0, 1.0, [("huge", 1, Shape(memory=64 * GiB))])
    for run in (third, second, first):
        for p, u, shape in units_of(run):
            add(w, run, p, u, shape)
    running = [Grant("r", (0, 1), 12 * GiB, 0.0, None)]
    assert explained(w, running, topo(4, memory=16 * GiB), "fifo-first-fit") == [
        ("a", 1, "hungry", 1, "memory"),  # the cores are there, 4 GiB of memory is not
        ("a", 1, "wide", 1, "cpus"),
        ("b", 2, "shards", 3, "cpus"),  # two would start now; the third waits behind them
        ("c", 3, "huge", 1, "node"),
    ]


def test_explain_names_the_stage_backfill_holds_back_for_the_head() -> None:
    w: Waitlist[Run] = Waitlist()
    head = Run("a", 1, 0.0, [("head", 1, Shape(cpus=2, walltime=5.0))])
    endless = Run("b", 0, 0.0, [("endless", 1, Shape())])  # no timeout: never before the head
    for run in (head, endless):
        for p, u, shape in units_of(run):
            add(w, run, p, u, shape)
    running = [Grant("r", (0,), 0, 0.0, 10.0)]
    assert explained(w, running, topo(2), "backfill") == [
        ("a", 1, "head", 1, "cpus"),
        ("b", 2, "endless", 1, "backfill"),
    ]
