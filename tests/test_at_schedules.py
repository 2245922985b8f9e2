"""A one-shot `at` schedule leaves schedules/ once its fire is handled, exactly once."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import Chute, wait_for
from daemon_proc import Daemon, daemon_factory, drop, runs_of

__all__ = ["daemon_factory"]


def at_job(name: str, when: datetime, extra: str = "") -> str:
    return (
        f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n"
        f"  run: 'true'\n  schedule: {{at: '{when.isoformat()}'{extra}}}\n"
    )


@pytest.mark.slow
def test_an_at_schedule_that_fired_is_removed_and_not_listed(
    spool: Path, daemon_factory: Callable[..., Daemon], chute: Chute
) -> None:
    d = daemon_factory().start()
    drop(spool, "once.yaml", at_job("once", datetime.now(UTC) + timedelta(seconds=2)))
    wait_for("schedules/once.yaml", (spool / "schedules" / "once.yaml").exists)
    [rec] = wait_for(
        "the fire's run to end",
        lambda: [r for r in runs_of(spool, "schedules/once.yaml") if r["state"] == "succeeded"],
    )
    assert rec["trigger"]["type"] == "at"
    wait_for(
        "the spent schedule to leave", lambda: not (spool / "schedules" / "once.yaml").exists()
    )
    assert "once" not in chute("schedules").out
    assert d.stop() == 0
    assert "INFO schedule once done: its `at` fire is past; removed schedules/once.yaml" in (
        d.log.read_text()
    )


def test_an_at_schedule_skipped_by_misfire_is_removed_without_a_run(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory().start()
    past = datetime.now(UTC) - timedelta(hours=2)
    drop(spool, "late.yaml", at_job("late", past, ", misfire: skip, grace: 1m"))
    wait_for(
        "the skipped schedule to leave",
        lambda: "schedule late done" in d.log.read_text(),
    )
    assert not (spool / "schedules" / "late.yaml").exists()
    assert runs_of(spool) == []
    assert d.stop() == 0


def test_a_crash_after_the_fire_and_before_the_removal_neither_loses_it_nor_fires_again(
    spool: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    d = daemon_factory(env={"CHUTE_CRASH_AT": "schedules.spent"}).start()
    drop(spool, "once.yaml", at_job("once", datetime.now(UTC) + timedelta(seconds=1)))
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == -9  # killed at the crash point, file still there
    d.proc = None
    assert (spool / "schedules" / "once.yaml").exists()
    d = daemon_factory().start()
    wait_for(
        "the spent schedule to leave", lambda: not (spool / "schedules" / "once.yaml").exists()
    )
    wait_for(
        "the run to end",
        lambda: all(r["state"] == "succeeded" for r in runs_of(spool)) and runs_of(spool),
    )
    assert len(runs_of(spool, "schedules/once.yaml")) == 1
    assert d.stop() == 0
