"""Scenario 1: kill -9 the daemon at random moments while files are dropped and run.

Pass: after the last restart every dropped file is accounted for exactly once (one run, or
one rejection), every run.json parses and is final, and no stage that finished ran again
(a stage's dependent never starts before the stage's last start, and each run keeps its id).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from conftest import wait_for
from daemon_proc import Daemon, assert_settled, daemon_factory, drop

__all__ = ["daemon_factory"]

FILES = 1000
KILLS = 20


def spec(i: int, ledger: Path) -> str:
    if i % 25 == 7:  # some bad files among the good: they must be rejected exactly once
        return f"apiVersion: chute/v1\nkind: Job\nmetadata: {{name: bad{i}}}\nspec:\n  cpus: 1\n"
    line = ledger / f"f{i:04d}"
    return (
        f"apiVersion: chute/v1\nkind: Pipeline\nmetadata: {{name: p{i}}}\nspec:\n  stages:\n"
        f"    - {{name: first, run: 'echo first $CHUTE_RUN_ID >> {line}'}}\n"
        f"    - {{name: second, dependsOn: [first], run: 'echo second $CHUTE_RUN_ID >> {line}'}}\n"
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_at_random_moments_loses_nothing_and_runs_nothing_twice(
    spool: Path, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    seed = int(os.environ.get("CHUTE_TEST_SEED", time.time_ns() % 100_000))
    print(f"seed {seed} (CHUTE_TEST_SEED reproduces the drop and kill timing)")
    rng = random.Random(seed)
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    (spool / "incoming").mkdir(parents=True)
    gaps = [rng.uniform(0.0, 0.03) for _ in range(FILES)]

    def dropper() -> None:
        for i in range(FILES):
            drop(spool, f"f{i:04d}.yaml", spec(i, ledger))
            time.sleep(gaps[i])

    thread = threading.Thread(target=dropper)
    d = daemon_factory("cpus: 2\nkill_grace: 1s\n").start()
    thread.start()
    kills = 0
    try:
        while kills < KILLS or thread.is_alive():
            time.sleep(rng.uniform(0.05, 0.8))
            d.stop(signal.SIGKILL)
            kills += 1
            d = daemon_factory("cpus: 2\nkill_grace: 1s\n").start()
    finally:
        thread.join()

    def settled() -> bool:
        return not any((spool / "incoming").iterdir()) and not any((spool / "queue").iterdir())

    wait_for("every file taken and every run finished", settled, timeout=300)
    assert d.stop() == 0

    runs: dict[str, list[dict[str, object]]] = {}
    for folder in (spool / "runs").iterdir():
        if folder.is_symlink() or folder.name.startswith("."):
            continue
        rec = orjson.loads((folder / "run.json").read_bytes())  # every run.json parses
        orjson.loads((folder / "manifest.json").read_bytes())
        assert_settled(folder)
        runs.setdefault(str(rec["trigger"]["source"]), []).append(rec)
    rejected = {p.name[: -len(".error.json")] for p in (spool / "rejected").glob("*.error.json")}
    for i in range(FILES):
        name = f"f{i:04d}.yaml"
        made = runs.get(f"incoming/{name}", [])
        if i % 25 == 7:
            assert made == [], name
            assert name in rejected, name
            continue
        assert name not in rejected, name
        assert len(made) == 1, f"{name}: {len(made)} runs"
        rec = made[0]
        assert rec["state"] == "succeeded", (name, rec)
        lines = (ledger / f"f{i:04d}").read_text().split("\n")[:-1]
        assert {x.split()[1] for x in lines} == {rec["run_id"]}, (name, lines)
        stages = [x.split()[0] for x in lines]
        last_first = max(n for n, s in enumerate(stages) if s == "first")
        first_second = min(n for n, s in enumerate(stages) if s == "second")
        assert last_first < first_second, (name, stages)
    assert kills >= KILLS
    recovered = sum(1 for recs in runs.values() for r in recs if r.get("recoveries"))
    print(f"{kills} kills, {len(runs)} runs, {len(rejected)} rejections, {recovered} resumed")
