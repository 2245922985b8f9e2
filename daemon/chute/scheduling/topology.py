"""The node's CPUs and memory as the allocator sees them: cores grouped by NUMA node.

Owns: reading the affinity mask, `<sysfs>/devices/system/node/node*/{cpulist,meminfo}`, and
the config keys `cpus`, `reserve_cpus` and `memory`; the kernel's cpulist text form
(`4-5,8`). Not here: handing cores to tasks (chute.scheduling.allocator), pinning them
(chute.execution.runner), the config file itself (chute.config).
Crash safety: reads only; a Topology is an immutable value, rebuilt on SIGHUP.
Diagnostics: a bad `cpus`/`reserve_cpus`/`memory` value is a user mistake: ValueError whose
message starts with the key and says what would be right. An unreadable sysfs file is an
environment problem: the OSError (with its path) propagates to the caller.
Limits: the NUMA layout is read once; CPU hotplug after start-up is not seen until a reload.
`memory: auto` is the node's physical memory, not a cgroup's memory limit. A core that no
node's cpulist names (offlined between the two reads) is counted in node 0.

Choices (docs/config.md tells them to users):
- `reserve_cpus: N` removes the N lowest-numbered cores of the affinity mask, whatever the
  `cpus` form: core 0 and its neighbours are where the kernel and systemd put their
  housekeeping (IRQs, RCU, timers), so those are the ones worth leaving to the OS. `cpus: 64`
  then takes the first 64 of what is left; `cpus: "0-31"` must name only cores that are left.
- In the config, an integer `cpus` is a count and a string is a cpulist: `cpus: 8` is eight
  cores, `cpus: "8"` is core 8.
- `Topology.nodes` is indexed by NUMA node id, so a node with no usable cores (a memory-only
  node, or one outside the mask) is an empty tuple, and `node_of` returns the kernel's id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from chute.units import SIZE_HINT, parse_size

_NODE_DIR = re.compile(r"^node(\d+)$")
_MEMTOTAL = re.compile(r"^Node\s+\d+\s+MemTotal:\s+(\d+)\s+kB\s*$", re.MULTILINE)
_CPULIST_HINT = "a cpulist like 0-3,8,10-11"


@dataclass(frozen=True, slots=True)
class Topology:
    """Usable cores by NUMA node (index = node id, cores sorted) and usable memory in bytes."""

    nodes: tuple[tuple[int, ...], ...]
    memory: int

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for i, cores in enumerate(self.nodes):
            if list(cores) != sorted(set(cores)):
                raise ValueError(f"node {i}: cores {cores} are not sorted and unique")
            if seen.intersection(cores):
                raise ValueError(
                    f"node {i}: cores {sorted(seen.intersection(cores))} "
                    "are already in another node"
                )
            seen.update(cores)
        if self.memory < 0:
            raise ValueError(f"memory: {self.memory} is negative")

    @property
    def cpus(self) -> tuple[int, ...]:
        """Every usable core, sorted."""
        return tuple(sorted(c for cores in self.nodes for c in cores))

    def node_of(self, core: int) -> int:
        """The NUMA node id of a usable core; ValueError for a core that is not usable."""
        for i, cores in enumerate(self.nodes):
            if core in cores:
                return i
        raise ValueError(f"core {core} is not one of the usable cores {self.cpulist(self.cpus)}")

    def cpulist(self, cores: Iterable[int]) -> str:
        """`cores` in the kernel's cpulist format (`4-5,8`), as CHUTE_CPU_LIST shows them."""
        return format_cpulist(cores)


def parse_cpulist(text: str) -> tuple[int, ...]:
    """The cores in a kernel cpulist (`0-3,8,10-11`), sorted and unique; `""` is none."""
    cores: set[int] = set()
    body = text.strip()
    if not body:
        return ()
    for part in body.split(","):
        item = part.strip()
        lo, sep, hi = item.partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise ValueError(
                f"{text.strip()!r}: {item!r} is not a core number or a range "
                f"like 4-7; expected {_CPULIST_HINT}"
            )
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(
                f"{text.strip()!r}: range {item!r} runs backwards; "
                f"write it low-high, as {last}-{first}"
            )
        cores.update(range(first, last + 1))
    return tuple(sorted(cores))


def format_cpulist(cores: Iterable[int]) -> str:
    """The kernel's cpulist text for `cores`: runs of two or more as `a-b`, e.g. `4-5,8`."""
    ordered = sorted(set(cores))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def read_topology(
    *,
    cpus: str | int = "auto",
    reserve_cpus: int = 0,
    memory: str | int = "auto",
    sysfs: Path = Path("/sys"),
    affinity: set[int] | None = None,
) -> Topology:
    """The usable cores and memory from the config keys, the affinity mask and sysfs.

    `affinity` replaces `os.sched_getaffinity(0)` (tests pass a 128-core mask on a small host).
    """
    mask = sorted(os.sched_getaffinity(0) if affinity is None else affinity)
    selected = _select_cores(mask, cpus, reserve_cpus)
    nodes = _group_by_node(selected, sysfs / "devices" / "system" / "node")
    return Topology(nodes=nodes, memory=_memory(memory, sysfs / "devices" / "system" / "node"))


def _select_cores(mask: list[int], cpus: str | int, reserve_cpus: int) -> tuple[int, ...]:
    if isinstance(reserve_cpus, bool) or not isinstance(reserve_cpus, int) or reserve_cpus < 0:
        raise ValueError(f"reserve_cpus: {reserve_cpus!r} is not a whole number >= 0")
    if reserve_cpus >= len(mask):
        raise ValueError(
            f"reserve_cpus: {reserve_cpus} leaves no cores: the daemon's affinity "
            f"mask has {len(mask)} ({format_cpulist(mask)}) — reserve fewer"
        )
    left = mask[reserve_cpus:]
    where = (
        f"the daemon's affinity mask less reserve_cpus: {format_cpulist(left)}"
        if reserve_cpus
        else f"the daemon's affinity mask: {format_cpulist(left)}"
    )
    if isinstance(cpus, bool):
        raise ValueError(f"cpus: {cpus!r} is not auto, a count like 64, or {_CPULIST_HINT}")
    if isinstance(cpus, int):
        if not 1 <= cpus <= len(left):
            raise ValueError(
                f"cpus: {cpus} is not between 1 and {len(left)}, the number of cores in {where}"
            )
        return tuple(left[:cpus])
    if cpus == "auto":
        return tuple(left)
    try:
        wanted = parse_cpulist(cpus)
    except ValueError as e:
        raise ValueError(f"cpus: {e} (or auto, or a count like 64)") from None
    if not wanted:
        raise ValueError(
            f"cpus: {cpus!r} names no cores; expected auto, a count like 64, or {_CPULIST_HINT}"
        )
    outside = sorted(set(wanted) - set(left))
    if outside:
        raise ValueError(
            f"cpus: {cpus!r} names cores outside {where}; not usable: {format_cpulist(outside)}"
        )
    return wanted


def _group_by_node(cores: tuple[int, ...], node_dir: Path) -> tuple[tuple[int, ...], ...]:
    listed: dict[int, set[int]] = {}
    if node_dir.is_dir():
        for entry in node_dir.iterdir():
            m = _NODE_DIR.match(entry.name)
            if m is None:
                continue
            cpulist = entry / "cpulist"
            text = cpulist.read_text() if cpulist.exists() else ""
            try:
                listed[int(m.group(1))] = set(parse_cpulist(text))
            except ValueError as e:
                raise ValueError(f"{cpulist}: {e}") from None
    if not listed:
        # Containers often hide /sys/devices/system/node: one node holds every core.
        return (cores,)
    nodes: list[list[int]] = [[] for _ in range(max(listed) + 1)]
    for core in cores:
        node = next((n for n, members in listed.items() if core in members), 0)
        nodes[node].append(core)
    return tuple(tuple(sorted(n)) for n in nodes)


def _memory(memory: str | int, node_dir: Path) -> int:
    if isinstance(memory, bool):
        raise ValueError(f"memory: {memory!r} is not auto or {SIZE_HINT}")
    if isinstance(memory, int):
        size = memory
    elif memory == "auto":
        return _node_memory(node_dir) or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        try:
            size = parse_size(memory)
        except ValueError:
            raise ValueError(f"memory: {memory!r} is not auto or {SIZE_HINT}") from None
    if size <= 0:
        raise ValueError(
            f"memory: {memory!r} is not more than 0 bytes; expected auto or {SIZE_HINT}"
        )
    return size


def _node_memory(node_dir: Path) -> int:
    """Sum of the nodes' MemTotal in bytes, or 0 when no node reports one."""
    total = 0
    if not node_dir.is_dir():
        return 0
    for entry in node_dir.iterdir():
        meminfo = entry / "meminfo"
        if _NODE_DIR.match(entry.name) and meminfo.exists():
            m = _MEMTOTAL.search(meminfo.read_text())
            if m is None:
                raise ValueError(f"{meminfo}: no 'Node N MemTotal: <n> kB' line")
            total += int(m.group(1)) * 1024
    return total
