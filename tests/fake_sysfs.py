"""A fake /sys tree for chute.scheduling.topology: NUMA nodes with a cpulist and a meminfo each.

The default is the 2-socket 128-core server of the tests: node0 0-63, node1 64-127,
128 GiB per node. conftest.py wraps it as the `fake_sysfs` fixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

GIB_KB = 1 << 20


def build_fake_sysfs(
    root: Path,
    nodes: Sequence[str] = ("0-63", "64-127"),
    *,
    node_memory_kb: int | Sequence[int | None] = 128 * GIB_KB,
    node_ids: Sequence[int] | None = None,
) -> Path:
    """Write `<root>/sys/devices/system/node/node<i>/{cpulist,meminfo}`; return `<root>/sys`.

    `nodes` are the nodes' cpulists ("" for a memory-only node); `node_ids` their ids
    (default 0, 1, …); `node_memory_kb` one MemTotal for all or one per node (None: no
    meminfo file). `nodes=()` leaves the node folder out, as in many containers.
    """
    sysfs = root / "sys"
    system = sysfs / "devices" / "system"
    system.mkdir(parents=True, exist_ok=True)
    if not nodes:
        return sysfs
    ids = list(node_ids) if node_ids is not None else list(range(len(nodes)))
    mems = (
        [node_memory_kb] * len(nodes) if isinstance(node_memory_kb, int) else list(node_memory_kb)
    )
    node_dir = system / "node"
    node_dir.mkdir(exist_ok=True)
    (node_dir / "online").write_text(",".join(map(str, ids)) + "\n")
    for node_id, cpulist, mem_kb in zip(ids, nodes, mems, strict=True):
        d = node_dir / f"node{node_id}"
        d.mkdir()
        (d / "cpulist").write_text(cpulist + "\n")
        if mem_kb is not None:
            (d / "meminfo").write_text(
                f"Node {node_id} MemTotal:       {mem_kb} kB\n"
                f"Node {node_id} MemFree:        {mem_kb // 2} kB\n"
                f"Node {node_id} MemUsed:        {mem_kb - mem_kb // 2} kB\n"
            )
    return sysfs
