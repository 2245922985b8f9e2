"""chute.scheduling.topology against a fake 2-socket 128-core /sys tree and against this machine's
/sys."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from chute.scheduling.topology import Topology, format_cpulist, parse_cpulist, read_topology
from fake_sysfs import GIB_KB, build_fake_sysfs

MASK_128 = set(range(128))
NODE0 = tuple(range(64))
NODE1 = tuple(range(64, 128))


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("0-3,8,10-11", (0, 1, 2, 3, 8, 10, 11)),
        ("5", (5,)),
        ("0-63\n", tuple(range(64))),
        ("", ()),
        ("\n", ()),
        ("8,0-2,1", (0, 1, 2, 8)),
        (" 4 - 5 , 8 ", (4, 5, 8)),
    ],
    ids=[
        "ranges-and-singles",
        "one-core",
        "sysfs-newline",
        "empty",
        "memory-only-node",
        "unsorted-overlapping",
        "spaces",
    ],
)
def test_cpulist_parses_kernel_format(text: str, cores: tuple[int, ...]) -> None:
    assert parse_cpulist(text) == cores


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "0-3,x",
            "'0-3,x': 'x' is not a core number or a range like 4-7; "
            "expected a cpulist like 0-3,8,10-11",
        ),
        ("7-4", "'7-4': range '7-4' runs backwards; write it low-high, as 4-7"),
        (
            "1,,2",
            "'1,,2': '' is not a core number or a range like 4-7; "
            "expected a cpulist like 0-3,8,10-11",
        ),
        (
            "-1",
            "'-1': '-1' is not a core number or a range like 4-7; "
            "expected a cpulist like 0-3,8,10-11",
        ),
    ],
    ids=["word", "backwards", "empty-item", "negative"],
)
def test_bad_cpulist_says_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_cpulist(text)


@pytest.mark.parametrize(
    ("cores", "text"),
    [
        ((4, 5, 8), "4-5,8"),
        ((), ""),
        ((3,), "3"),
        ((0, 1, 2, 3, 8, 10, 11), "0-3,8,10-11"),
        ((9, 1, 2, 2), "1-2,9"),
    ],
    ids=["pair-is-a-range", "none", "one", "mixed", "unsorted-duplicates"],
)
def test_cpulist_formats_like_the_kernel(cores: tuple[int, ...], text: str) -> None:
    assert format_cpulist(cores) == text
    assert parse_cpulist(text) == tuple(sorted(set(cores)))


def test_two_socket_server_groups_cores_by_numa_node(tmp_path: Path) -> None:
    sysfs = build_fake_sysfs(tmp_path)
    topo = read_topology(sysfs=sysfs, affinity=MASK_128)
    assert topo.nodes == (NODE0, NODE1)
    assert topo.cpus == tuple(range(128))
    assert topo.memory == 2 * 128 * GIB_KB * 1024
    assert topo.node_of(63) == 0
    assert topo.node_of(64) == 1
    assert topo.cpulist([64, 4, 5, 8]) == "4-5,8,64"


def test_node_of_a_core_that_is_not_usable_names_the_usable_ones() -> None:
    topo = Topology(nodes=((0, 1), (2, 3)), memory=0)
    with pytest.raises(
        ValueError, match=f"^{re.escape('core 7 is not one of the usable cores 0-3')}$"
    ):
        topo.node_of(7)


@pytest.mark.parametrize(
    ("cpus", "reserve", "affinity", "nodes"),
    [
        ("auto", 0, MASK_128, (NODE0, NODE1)),
        ("auto", 2, MASK_128, (tuple(range(2, 64)), NODE1)),
        (64, 0, MASK_128, (NODE0, ())),
        (70, 0, MASK_128, (NODE0, tuple(range(64, 70)))),
        (4, 2, MASK_128, ((2, 3, 4, 5), ())),
        ("0-31,64-95", 0, MASK_128, (tuple(range(32)), tuple(range(64, 96)))),
        ("auto", 0, set(range(32, 96)), (tuple(range(32, 64)), tuple(range(64, 96)))),
        ("auto", 4, set(range(32, 96)), (tuple(range(36, 64)), tuple(range(64, 96)))),
        (8, 0, {100, 3, 1, 64, 2, 70, 5, 6, 9}, ((1, 2, 3, 5, 6, 9), (64, 70))),
    ],
    ids=[
        "auto-is-the-mask",
        "reserve-takes-lowest-cores",
        "count-fills-node0-first",
        "count-spills-to-node1",
        "count-after-reserve",
        "cpulist-exactly",
        "auto-follows-affinity",
        "reserve-from-affinity",
        "count-is-first-n-of-mask",
    ],
)
def test_cpus_select_cores_from_the_affinity_mask(
    tmp_path: Path,
    cpus: str | int,
    reserve: int,
    affinity: set[int],
    nodes: tuple[tuple[int, ...], ...],
) -> None:
    sysfs = build_fake_sysfs(tmp_path)
    topo = read_topology(cpus=cpus, reserve_cpus=reserve, sysfs=sysfs, affinity=affinity)
    assert topo.nodes == nodes


@pytest.mark.parametrize(
    ("cpus", "reserve", "message"),
    [
        (
            "0-3,200-201",
            0,
            "cpus: '0-3,200-201' names cores outside the daemon's affinity "
            "mask: 0-127; not usable: 200-201",
        ),
        (
            "0-3",
            2,
            "cpus: '0-3' names cores outside the daemon's affinity mask less "
            "reserve_cpus: 2-127; not usable: 0-1",
        ),
        (
            129,
            0,
            "cpus: 129 is not between 1 and 128, the number of cores in the daemon's "
            "affinity mask: 0-127",
        ),
        (
            0,
            0,
            "cpus: 0 is not between 1 and 128, the number of cores in the daemon's "
            "affinity mask: 0-127",
        ),
        (
            "all",
            0,
            "cpus: 'all': 'all' is not a core number or a range like 4-7; expected a "
            "cpulist like 0-3,8,10-11 (or auto, or a count like 64)",
        ),
        (
            "",
            0,
            "cpus: '' names no cores; expected auto, a count like 64, or a cpulist like "
            "0-3,8,10-11",
        ),
        (True, 0, "cpus: True is not auto, a count like 64, or a cpulist like 0-3,8,10-11"),
        (
            "auto",
            128,
            "reserve_cpus: 128 leaves no cores: the daemon's affinity mask has 128 "
            "(0-127) — reserve fewer",
        ),
        ("auto", -1, "reserve_cpus: -1 is not a whole number >= 0"),
    ],
    ids=[
        "cpulist-outside-mask",
        "cpulist-on-reserved-cores",
        "count-too-big",
        "count-zero",
        "word",
        "empty-cpulist",
        "boolean",
        "reserve-everything",
        "negative-reserve",
    ],
)
def test_bad_cpus_config_says_what_is_usable(
    tmp_path: Path, cpus: str | int, reserve: int, message: str
) -> None:
    sysfs = build_fake_sysfs(tmp_path)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        read_topology(cpus=cpus, reserve_cpus=reserve, sysfs=sysfs, affinity=MASK_128)


def test_missing_node_folder_makes_one_node_of_all_cores(tmp_path: Path) -> None:
    sysfs = build_fake_sysfs(tmp_path, nodes=())
    topo = read_topology(sysfs=sysfs, affinity=MASK_128)
    assert topo.nodes == (tuple(range(128)),)
    assert topo.memory == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_sparse_node_ids_keep_their_ids_and_memory_only_nodes_are_empty(tmp_path: Path) -> None:
    sysfs = build_fake_sysfs(
        tmp_path, nodes=("0-3", "", "4-7"), node_ids=(0, 1, 3), node_memory_kb=(GIB_KB, GIB_KB, 0)
    )
    topo = read_topology(sysfs=sysfs, affinity=set(range(8)))
    assert topo.nodes == ((0, 1, 2, 3), (), (), (4, 5, 6, 7))
    assert topo.node_of(5) == 3
    assert topo.memory == 2 << 30


def test_core_no_node_lists_is_counted_in_node_zero(tmp_path: Path) -> None:
    sysfs = build_fake_sysfs(tmp_path, nodes=("0-1", "2-3"))
    topo = read_topology(sysfs=sysfs, affinity={0, 1, 2, 3, 4})
    assert topo.nodes == ((0, 1, 4), (2, 3))


@pytest.mark.parametrize(
    ("memory", "expected"),
    [("auto", 256 << 30), ("64GiB", 64 << 30), (1000, 1000), ("512MiB", 512 << 20)],
    ids=["auto-sums-node-meminfo", "size-text", "int-is-bytes", "mebibytes"],
)
def test_memory_config(tmp_path: Path, memory: str | int, expected: int) -> None:
    sysfs = build_fake_sysfs(tmp_path)
    assert read_topology(memory=memory, sysfs=sysfs, affinity=MASK_128).memory == expected


def test_memory_auto_falls_back_to_physical_pages_without_node_meminfo(tmp_path: Path) -> None:
    sysfs = build_fake_sysfs(tmp_path, node_memory_kb=(None, None))
    topo = read_topology(sysfs=sysfs, affinity=MASK_128)
    assert topo.memory == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ("lots", "memory: 'lots' is not auto or a size like 512MiB or 4GiB"),
        (0, "memory: 0 is not more than 0 bytes; expected auto or a size like 512MiB or 4GiB"),
        (False, "memory: False is not auto or a size like 512MiB or 4GiB"),
    ],
    ids=["word", "zero", "boolean"],
)
def test_bad_memory_config_names_the_forms(tmp_path: Path, memory: str | int, message: str) -> None:
    sysfs = build_fake_sysfs(tmp_path)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        read_topology(memory=memory, sysfs=sysfs, affinity=MASK_128)


def test_garbled_node_meminfo_names_the_file(tmp_path: Path) -> None:
    sysfs = build_fake_sysfs(tmp_path)
    meminfo = sysfs / "devices/system/node/node1/meminfo"
    meminfo.write_text("nonsense\n")
    message = f"{meminfo}: no 'Node N MemTotal: <n> kB' line"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        read_topology(sysfs=sysfs, affinity=MASK_128)


def test_this_machine_reads_its_own_mask_and_memory() -> None:
    topo = read_topology()
    mask = tuple(sorted(os.sched_getaffinity(0)))
    assert topo.cpus == mask
    assert topo.memory > 0
    node_dir = Path("/sys/devices/system/node")
    if any(node_dir.glob("node[0-9]*/cpulist")):
        for node_id, cores in enumerate(topo.nodes):
            listed = node_dir / f"node{node_id}" / "cpulist"
            if cores:
                assert set(cores) <= set(parse_cpulist(listed.read_text()))
    else:
        assert topo.nodes == (mask,)


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (((1, 0),), "node 0: cores (1, 0) are not sorted and unique"),
        (((0, 1), (1, 2)), "node 1: cores [1] are already in another node"),
    ],
    ids=["unsorted", "shared-core"],
)
def test_topology_refuses_inconsistent_nodes(
    nodes: tuple[tuple[int, ...], ...], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Topology(nodes=nodes, memory=0)
