"""What stops the daemon at start: one ERROR line that says what to fix, and exit 2.

Exit 2 is the unit's RestartPreventExitStatus=: a bad config or an unusable spool is the
operator's to fix, and systemd restarting the daemon every 2 s would only fill the journal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import tmpfs
from daemon_proc import Daemon, daemon_factory

__all__ = ["daemon_factory"]


def failed_start(d: Daemon) -> list[str]:
    """Start `d`, expect exit 2; its log's ERROR lines (without time and level)."""
    d.start(wait_ready=False)
    assert d.proc is not None
    code = d.proc.wait(timeout=60)
    d.proc = None
    text = d.log.read_text()
    assert code == 2, text
    assert "Traceback" not in text
    return [line.split(" ERROR ", 1)[1] for line in text.splitlines() if " ERROR " in line]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            'cpus: "0-999"',
            "cpus: '0-999' names cores outside the daemon's affinity mask",
        ),
        ("reserve_cpus: 999", "reserve_cpus: 999 leaves no cores"),
    ],
    ids=["cpus-beyond-the-node", "reserve-all-cpus"],
)
def test_cpus_the_node_cannot_give_stop_the_start_with_one_line(
    daemon_factory: Callable[..., Daemon], config: str, expected: str
) -> None:
    d = daemon_factory(config)
    [line] = failed_start(d)
    assert line.startswith(f"config {d.config}: {expected}"), line


def test_a_read_only_spool_stops_the_start_with_one_line(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    with tmpfs(spool, "ro,size=1m"):
        [line] = failed_start(daemon_factory())
    assert line == (
        f"cannot write {spool}/incoming: Read-only file system (EROFS); the daemon writes "
        "every folder of its spool: make it writable by root and mounted read-write, or pass "
        "another --spool"
    )


def test_a_read_only_runs_dir_stops_the_start_and_names_runs_dir(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    runs = tmp_path / "runs-ro"
    runs.mkdir()
    with tmpfs(runs, "ro,size=1m"):
        [line] = failed_start(daemon_factory(f"runs_dir: {runs}"))
    assert line == (
        f"cannot write {runs}: Read-only file system (EROFS); the daemon writes every folder "
        "of its spool: make it writable by root and mounted read-write, or set runs_dir in "
        "the config to a writable folder"
    )
