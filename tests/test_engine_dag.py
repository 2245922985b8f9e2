"""The run state machine on its own: pure transitions with time passed in."""

from __future__ import annotations

from typing import Any

import pytest

from chute.engine.backoff import retry_delay, should_retry
from chute.engine.dag import RunGraph
from chute.engine.stage import Reused, Unit
from chute.execution.executor import Result
from chute.spec.model import Fallback, Pipeline, Retries, Shards, Stage


def graph(*stages: Stage, fail_fast: bool = False) -> RunGraph:
    return RunGraph("r1", Pipeline("Pipeline", "p", tuple(stages), fail_fast=fail_fast))


def ok(u: Unit) -> Result:
    return Result(key=u.key, exit_code=0)


def fail(u: Unit, code: int = 1) -> Result:
    return Result(key=u.key, exit_code=code, error=f"exit code {code}")


def start_all(g: RunGraph, now: float = 0.0) -> list[Unit]:
    units = g.take_ready(now)
    for u in units:
        g.start(u, (0,), now)
    return units


@pytest.mark.parametrize(
    ("retries", "attempt", "delay"),
    [
        (Retries(max=5, delay=2.0), 1, 2.0),
        (Retries(max=5, delay=2.0), 4, 2.0),
        (Retries(max=5, backoff="exponential", delay=2.0), 1, 2.0),
        (Retries(max=5, backoff="exponential", delay=2.0), 3, 8.0),
        (Retries(max=5, backoff="exponential", delay=2.0, max_delay=5.0), 3, 5.0),
    ],
    ids=["fixed-first", "fixed-later", "exp-first", "exp-third", "exp-capped"],
)
def test_retry_delay_follows_the_backoff(retries: Retries, attempt: int, delay: float) -> None:
    assert retry_delay(retries, attempt) == delay


def test_on_exit_codes_limits_which_failures_retry() -> None:
    r = Retries(max=2, on_exit_codes=(75,))
    assert should_retry(r, 1, 75)
    assert not should_retry(r, 1, 1)
    assert not should_retry(r, 1, None)  # a timeout has no exit code
    assert not should_retry(r, 3, 75)


def test_dependent_becomes_ready_only_when_its_own_dependency_succeeds() -> None:
    g = graph(Stage("a"), Stage("b"), Stage("c", depends_on=("a",)))
    a, b = start_all(g)
    assert [u.stage for u in (a, b)] == ["a", "b"]
    assert g.take_ready(0.0) == []
    g.finish(a, ok(a), 1.0, 1.0)
    ready = g.take_ready(1.0)
    assert [u.stage for u in ready] == ["c"]
    assert g.stages["b"].state == "running"


def test_retry_waits_its_delay_on_the_given_clock() -> None:
    g = graph(Stage("a", retries=Retries(max=1, delay=5.0)))
    (a,) = start_all(g)
    g.finish(a, fail(a), mono=10.0, wall=10.0)
    assert g.take_ready(14.9) == []
    assert g.next_retry() == 15.0
    (again,) = g.take_ready(15.0)
    g.start(again, (0,), 15.0)
    g.finish(again, ok(again), 16.0, 16.0)
    assert g.state == "succeeded"
    assert [a.exit_code for a in g.stages["a"].units[0].attempts] == [1, 0]


def test_lost_task_is_rerun_without_charging_an_attempt() -> None:
    g = graph(Stage("a"))
    (a,) = start_all(g)
    g.finish(a, Result(key=a.key, lost=True, error="pool broke"), 1.0, 1.0)
    (again,) = g.take_ready(1.0)
    assert again is a
    assert a.attempts == []


def test_failure_skips_dependents_transitively_and_fails_the_run() -> None:
    g = graph(Stage("a"), Stage("b", depends_on=("a",)), Stage("c", depends_on=("b",)), Stage("d"))
    a, d = start_all(g)
    g.finish(a, fail(a), 1.0, 1.0)
    assert g.stages["b"].state == "skipped"
    assert g.stages["c"].state == "skipped"
    assert not g.done
    g.finish(d, ok(d), 2.0, 2.0)
    assert g.done
    assert g.state == "failed"


def test_fallback_result_lets_dependents_run() -> None:
    g = graph(Stage("a", fallback=Fallback(run="echo degraded")), Stage("b", depends_on=("a",)))
    (a,) = start_all(g)
    g.finish(a, fail(a), 1.0, 1.0)
    (fb,) = g.take_ready(1.0)
    assert fb.fallback
    g.start(fb, (0,), 1.0)
    g.finish(fb, ok(fb), 2.0, 2.0, data={"degraded": True})
    assert g.stages["a"].state == "fallback"
    assert g.stages["a"].data == {"degraded": True}
    assert [u.stage for u in g.take_ready(2.0)] == ["b"]


def test_fail_fast_returns_running_units_to_cancel_and_cancels_the_rest() -> None:
    g = graph(Stage("a"), Stage("b"), Stage("c", depends_on=("b",)), fail_fast=True)
    a, b = start_all(g)
    to_cancel = g.finish(a, fail(a), 1.0, 1.0)
    assert to_cancel == [b]
    g.finish(b, Result(key=b.key, cancelled=True, error="cancelled"), 2.0, 2.0)
    assert g.stages["b"].state == "cancelled"
    assert g.stages["c"].state in ("skipped", "cancelled")
    assert g.state == "failed"


def test_shard_failure_stops_unstarted_siblings_and_fails_the_stage() -> None:
    g = graph(Stage("s", shards=Shards(3)))
    units = g.take_ready(0.0)
    g.start(units[0], (0,), 0.0)
    g.finish(units[0], fail(units[0]), 1.0, 1.0)
    assert [u.state for u in units] == ["failed", "skipped", "skipped"]
    assert g.stages["s"].state == "failed"


def test_shard_outputs_are_gathered_in_index_order_whatever_the_finish_order() -> None:
    g = graph(Stage("s", shards=Shards(3)))
    units = start_all(g)
    for u in reversed(units):
        g.finish(u, ok(u), 1.0, 1.0, data={"i": u.shard})
    assert g.stages["s"].data == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_cancel_stops_running_units_and_marks_everything_cancelled() -> None:
    g = graph(Stage("a"), Stage("b", depends_on=("a",)))
    (a,) = start_all(g)
    assert g.cancel(1.0) == [a]
    g.finish(a, Result(key=a.key, cancelled=True, error="cancelled"), 2.0, 2.0)
    assert g.done
    assert g.state == "cancelled"


def test_reused_stages_count_as_done_and_keep_their_data() -> None:
    entry = {"name": "a", "state": "succeeded", "attempts": []}
    g = RunGraph(
        "r2",
        Pipeline("Pipeline", "p", (Stage("a"), Stage("b", depends_on=("a",)))),
        {"a": Reused(entry=entry, data={"x": 1}, output_hash="h")},
    )
    (b,) = g.take_ready(0.0)
    assert b.stage == "b"
    assert g.upstream_data(g.stages["b"].spec) == {"a": {"x": 1}}
    assert g.manifest()[0] == entry


def fail_until_done(g: RunGraph, unit: Unit, times: int) -> Unit:
    """Fail `unit` `times` times, each retry started as soon as it is due (delay 0)."""
    for n in range(times):
        g.finish(unit, fail(unit, 3), float(n), float(n))
        ready = g.take_ready(float(n))
        if not ready:
            break
        (unit,) = ready
        g.start(unit, (0,), float(n))
    return unit


def test_a_unit_keeps_its_first_and_last_three_attempts_and_counts_them_all() -> None:
    g = graph(Stage("a", retries=Retries(max=9, delay=0.0)))
    (a,) = start_all(g)
    fail_until_done(g, a, 10)
    assert g.stages["a"].state == "failed", "the 10th attempt (9 retries) was the last"
    assert [x.attempt for x in a.attempts] == [1, 2, 3, 8, 9, 10]
    assert a.attempts_total == 10
    entry = g.manifest()[0]
    assert [x["attempt"] for x in entry["attempts"]] == [1, 2, 3, 8, 9, 10]
    assert (entry["attempts_total"], entry["attempts_omitted"]) == (10, 4)


def test_a_lost_attempt_past_the_kept_ones_is_taken_back_and_the_next_gets_its_number() -> None:
    g = graph(Stage("a", retries=Retries(max=20, delay=0.0)))
    (a,) = start_all(g)
    a = fail_until_done(g, a, 7)  # attempt 8 is running
    g.finish(a, Result(key=a.key, lost=True, error="pool broke"), 8.0, 8.0)
    assert a.attempts_total == 7
    (again,) = g.take_ready(8.0)
    g.start(again, (0,), 8.0)
    g.finish(again, ok(again), 9.0, 9.0)
    assert [x.attempt for x in a.attempts] == [1, 2, 3, 6, 7, 8]
    entry = g.manifest()[0]
    assert (entry["state"], entry["attempts_total"], entry["attempts_omitted"]) == (
        "succeeded",
        8,
        2,
    )


def test_a_shards_manifest_entry_follows_every_change_of_the_shard() -> None:
    g = graph(Stage("s", shards=Shards(2), retries=Retries(max=1, delay=5.0)))
    first, second = start_all(g)

    def entry() -> dict[str, Any]:
        shard: dict[str, Any] = g.manifest()[0]["shards"][0]
        return shard

    assert (entry()["state"], len(entry()["attempts"])) == ("running", 1)
    g.finish(first, fail(first), 1.0, 1.0)
    assert entry()["state"] == "pending"
    assert entry()["attempts"] == [first.attempts[0].entry()]
    (again,) = g.take_ready(6.0)
    g.start(again, (1,), 6.0)
    assert (entry()["state"], entry()["cores"], entry()["attempts_total"]) == ("running", [1], 2)
    g.finish(again, ok(again), 7.0, 7.0)
    g.finish(second, ok(second), 7.0, 7.0)
    assert entry()["state"] == "succeeded"
    assert g.manifest()[0]["state"] == "succeeded"


@pytest.mark.parametrize("resumes", [True, False], ids=["stopped", "interrupted"])
def test_halt_ends_every_open_attempt_and_leaves_nothing_running(resumes: bool) -> None:
    g = graph(
        Stage("a"),
        Stage("wide", depends_on=("a",), shards=Shards(count=3)),
        Stage("after", depends_on=("wide",)),
    )
    (a,) = start_all(g)
    g.finish(a, ok(a), 1.0, 1.0)
    first, second, _waiting = g.take_ready(1.0)
    g.start(first, (0,), 1.0)
    g.start(second, (1,), 1.0)  # the third waits for a core
    g.finish(first, ok(first), 2.0, 2.0)
    g.halt("stopped with the daemon", 3.0, resumes=resumes)
    entries = {e["name"]: e for e in g.manifest()}
    [attempt] = entries["wide"]["shards"][1]["attempts"]
    assert attempt["finished_at"] is not None
    assert attempt["error"] == "stopped with the daemon"
    assert attempt["cores"] == [1]
    left = "pending" if resumes else "cancelled"
    assert [s["state"] for s in entries["wide"]["shards"]] == ["succeeded", left, left]
    assert (entries["a"]["state"], entries["wide"]["state"], entries["after"]["state"]) == (
        "succeeded",
        left,
        left,
    )
    assert g.done is not resumes
    assert g.take_ready(10.0) == []
