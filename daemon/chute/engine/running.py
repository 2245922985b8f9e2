"""The tasks running now and what each holds: its unit, its cores and memory, the folders the
executor made for it.

Owns: the engine's running tasks by key, the grants they hold, and what is free of the
node. Not here: which tasks start (chute.engine.loop, chute.scheduling.allocator), their
processes (chute.execution).
Pure: no I/O and no clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from chute.engine.runs import ActiveRun
from chute.engine.stage import Unit
from chute.scheduling import allocator
from chute.scheduling.topology import Topology


class Held(NamedTuple):
    """A running task: its run, unit and grant."""

    run: ActiveRun
    unit: Unit
    grant: allocator.Grant


class Running:
    """Running tasks by key (Unit.key)."""

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        self._folders: dict[str, tuple[Path, ...]] = {}  # key -> Task.folders

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, run: ActiveRun, unit: Unit, grant: allocator.Grant) -> None:
        self._held[unit.key] = Held(run, unit, grant)

    def made_for(self, key: str, folders: tuple[Path, ...]) -> None:
        """The executor makes `folders` for task `key` (Task.folders), parents first."""
        self._folders[key] = folders

    def release(self, key: str) -> tuple[Held | None, tuple[Path, ...]]:
        """Task `key` ended: what it held (None: not a task of ours), and the folders the
        executor was to make for it."""
        return self._held.pop(key, None), self._folders.pop(key, ())

    def clear(self) -> None:
        self._held.clear()
        self._folders.clear()

    def grants(self) -> list[allocator.Grant]:
        return [h.grant for h in self._held.values()]

    def of(self, run: ActiveRun) -> bool:
        """Whether a task of `run` is running."""
        return any(h.run is run for h in self._held.values())

    def cores_in_use(self) -> int:
        return sum(len(h.grant.cores) for h in self._held.values())

    def cores_by_node(self, topology: Topology) -> dict[int, int]:
        """Cores held, by NUMA node of `topology`."""
        out: dict[int, int] = {}
        for h in self._held.values():
            for core in h.grant.cores:
                try:
                    node = topology.node_of(core)
                except ValueError:  # a core a config reload took away, until its task ends
                    continue
                out[node] = out.get(node, 0) + 1
        return out


def free_of(topology: Topology, grants: list[allocator.Grant]) -> tuple[int, int]:
    """The cores and memory of `topology` that `grants` leave free."""
    busy = {core for g in grants for core in g.cores}
    free = sum(1 for core in topology.cpus if core not in busy)
    return free, topology.memory - sum(g.memory for g in grants)
