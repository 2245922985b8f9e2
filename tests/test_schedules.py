"""chute.scheduling.schedules, .triggers and .cron: fire times, daylight saving, misfires,
restarts, clock jumps, overlap.

Pure tests: `now` is an argument; the only I/O is schedules.json in a temporary folder.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from chute.scheduling.cron import crontab_weekdays
from chute.scheduling.schedules import STATE_FILE, Fire, Schedules, overlap_decision
from chute.scheduling.triggers import MISSED_CAP
from chute.spec.model import Schedule

T = datetime.fromisoformat


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def cron(expr: str, tz: str = "UTC", **kw: Any) -> Schedule:
    return Schedule(cron=expr, timezone=tz, **kw)


def every(seconds: float, **kw: Any) -> Schedule:
    return Schedule(every=seconds, **kw)


def one(state: Path, schedule: Schedule, accepted: str, name: str = "job") -> Schedules:
    s = Schedules(state)
    s.set(name, schedule, T(accepted))
    return s


def step_loop(s: Schedules, start: str, until: str) -> list[str]:
    """The daemon's loop: wake at each next fire, take what is due, record it."""
    now, end, fired = T(start), T(until), []
    while (wake := s.next_wakeup(now)) is not None and wake <= end:
        now = wake
        for f in s.due(now).fires:
            fired.append(f.fire_time.isoformat())
            s.record(f.name, f.fire_time)
    return fired


# -- next fire times ---------------------------------------------------------------------

NEXT_FIRES = [
    ("0 2 * * *", "Asia/Shanghai", "2026-11-23T10:00:00+00:00", "2026-11-24T02:00:00+08:00"),
    ("0 2 * * *", "UTC", "2026-11-23T01:59:59+00:00", "2026-11-23T02:00:00+00:00"),
    ("0 2 * * 0", "UTC", "2026-03-02T00:00:00+00:00", "2026-03-08T02:00:00+00:00"),
    ("0 2 * * 7", "UTC", "2026-03-02T00:00:00+00:00", "2026-03-08T02:00:00+00:00"),
    ("0 2 * * sun", "UTC", "2026-03-02T00:00:00+00:00", "2026-03-08T02:00:00+00:00"),
    ("* * * * 1-5", "UTC", "2026-03-07T12:00:00+00:00", "2026-03-09T00:00:00+00:00"),
    ("* * * * 1-5", "UTC", "2026-03-09T12:00:00+00:00", "2026-03-09T12:01:00+00:00"),
    ("0 9 * * 5-7", "UTC", "2026-03-09T12:00:00+00:00", "2026-03-13T09:00:00+00:00"),
    ("0 0 1 * 1", "UTC", "2026-03-24T00:00:00+00:00", "2026-03-30T00:00:00+00:00"),
    ("0 0 1 * 1", "UTC", "2026-03-30T00:00:00+00:00", "2026-04-01T00:00:00+00:00"),
    ("0 0 */2 * *", "UTC", "2026-03-01T00:00:00+00:00", "2026-03-03T00:00:00+00:00"),
    ("30 2 * * *", "America/New_York", "2026-03-08T00:00:00-05:00", "2026-03-08T03:00:00-04:00"),
    ("0 2 * * *", "America/New_York", "2026-03-08T00:00:00-05:00", "2026-03-08T03:00:00-04:00"),
    ("30 2 * * *", "America/New_York", "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"),
    ("30 1 * * *", "America/New_York", "2026-11-01T00:00:00-04:00", "2026-11-01T01:30:00-04:00"),
    ("30 1 * * *", "America/New_York", "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"),
    ("30 1 * * *", "America/New_York", "2026-11-01T01:10:00-05:00", "2026-11-02T01:30:00-05:00"),
    ("30 2 * * *", "Europe/Berlin", "2026-03-29T00:00:00+01:00", "2026-03-29T03:00:00+02:00"),
    ("0 2 * * *", "Europe/Berlin", "2026-03-29T00:00:00+01:00", "2026-03-29T03:00:00+02:00"),
    ("30 2 * * *", "Europe/Berlin", "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"),
    ("0 0 30 2 *", "UTC", "2026-01-01T00:00:00+00:00", None),
]


@pytest.mark.parametrize(
    ("expr", "tz", "now", "expected"),
    NEXT_FIRES,
    ids=[
        "daily in Asia/Shanghai shows +08:00",
        "one second before",
        "weekday 0 is Sunday",
        "weekday 7 is Sunday",
        "weekday names",
        "1-5 skips the weekend",
        "1-5 on a Monday",
        "5-7 is Friday to Sunday",
        "day of month or weekday: a Monday",
        "day of month or weekday: the 1st",
        "day of month step",
        "New York gap 02:30 fires at 03:00 EDT",
        "New York gap start 02:00 fires at 03:00 EDT",
        "New York after the gap back on 02:30",
        "New York repeated 01:30 fires at its first occurrence",
        "New York repeated 01:30 does not fire again at -05:00",
        "New York inside the second 01:xx waits for tomorrow",
        "Berlin gap 02:30 fires at 03:00 CEST",
        "Berlin gap start 02:00 fires at 03:00 CEST",
        "Berlin repeated 02:30 fires once",
        "February 30th never fires",
    ],
)
def test_cron_next_fire_follows_crontab_and_daylight_saving(
    state: Path, expr: str, tz: str, now: str, expected: str | None
) -> None:
    s = one(state, cron(expr, tz), "2026-01-01T00:00:00+00:00")
    nxt = s.next_fire("job", T(now))
    assert (None if nxt is None else nxt.isoformat()) == expected


def test_weekday_zero_fires_on_a_sunday_and_one_to_five_on_weekdays(state: Path) -> None:
    s = Schedules(state)
    s.set("sunday", cron("0 2 * * 0"), T("2026-03-01T03:00:00+00:00"))
    s.set("weekdays", cron("0 12 * * 1-5"), T("2026-03-01T03:00:00+00:00"))
    days: dict[str, set[str]] = {"sunday": set(), "weekdays": set()}
    now = T("2026-03-01T03:00:00+00:00")
    while (wake := s.next_wakeup(now)) is not None and wake < T("2026-03-29T00:00:00+00:00"):
        now = wake
        for f in s.due(now).fires:
            days[f.name].add(f.fire_time.strftime("%a"))
            s.record(f.name, f.fire_time)
    assert days == {"sunday": {"Sun"}, "weekdays": {"Mon", "Tue", "Wed", "Thu", "Fri"}}


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("*", "*"),
        ("0", "sun"),
        ("7", "sun"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("5-7", "sun,fri,sat"),
        ("fri-sun", "sun,fri,sat"),
        ("*/2", "sun,tue,thu,sat"),
        ("0,6", "sun,sat"),
        ("MON,wed", "mon,wed"),
        ("0-7", "*"),
    ],
    ids=[
        "star",
        "zero",
        "seven",
        "range",
        "range to 7",
        "names wrap",
        "step",
        "list",
        "case",
        "all",
    ],
)
def test_crontab_weekdays_become_apscheduler_names(field: str, expected: str) -> None:
    assert crontab_weekdays(field) == expected


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (
            "8",
            "'8' is not a weekday; expected 0-7 (0 and 7 are Sunday) "
            "or sun, mon, tue, wed, thu, fri, sat",
        ),
        ("5-2", "range '5-2' runs backwards; expected a range within 0-7"),
        ("*/0", "step '0' in '*/0'; expected a number from 1"),
    ],
    ids=["out of range", "backwards", "zero step"],
)
def test_bad_weekday_fields_say_what_is_expected(field: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        crontab_weekdays(field)


# -- daylight saving through the loop ----------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "tz", "start", "until", "fired"),
    [
        (
            "*/20 * * * *",
            "America/New_York",
            "2026-03-08T01:30:00-05:00",
            "2026-03-08T03:30:00-04:00",
            ["2026-03-08T01:40:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-08T03:20:00-04:00"],
        ),
        (
            "30 * * * *",
            "America/New_York",
            "2026-11-01T00:00:00-04:00",
            "2026-11-01T03:00:00-05:00",
            ["2026-11-01T00:30:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-01T02:30:00-05:00"],
        ),
        (
            "15 2 * * *",
            "Europe/Berlin",
            "2026-03-28T00:00:00+01:00",
            "2026-03-31T00:00:00+02:00",
            ["2026-03-28T02:15:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:15:00+02:00"],
        ),
        (
            "15 2 * * *",
            "Europe/Berlin",
            "2026-10-24T00:00:00+02:00",
            "2026-10-27T00:00:00+01:00",
            ["2026-10-24T02:15:00+02:00", "2026-10-25T02:15:00+02:00", "2026-10-26T02:15:00+01:00"],
        ),
    ],
    ids=[
        "New York spring: the skipped hour's fires become one at 03:00",
        "New York autumn: the repeated 01:30 fires once",
        "Berlin spring: 02:15 fires once at 03:00",
        "Berlin autumn: 02:15 fires once, at +02:00",
    ],
)
def test_daylight_saving_transitions_fire_once(
    state: Path, expr: str, tz: str, start: str, until: str, fired: list[str]
) -> None:
    s = one(state, cron(expr, tz), start)
    assert step_loop(s, start, until) == fired


# -- at ----------------------------------------------------------------------------------


def test_at_fires_once_and_then_has_no_next_fire(state: Path) -> None:
    at = Schedule(at=T("2026-12-01T02:00:00+08:00"), timezone="Asia/Shanghai")
    s = one(state, at, "2026-11-01T00:00:00+00:00")
    before = T("2026-11-30T17:59:59+00:00")
    assert s.due(before).fires == ()
    assert s.next_fire("job", before) == T("2026-12-01T02:00:00+08:00")

    fires = s.due(T("2026-11-30T18:00:01+00:00")).fires
    assert fires == (Fire("job", T("2026-12-01T02:00:00+08:00"), "at", 0, "2026-12-01"),)
    s.record("job", fires[0].fire_time)

    later = T("2026-12-02T00:00:00+00:00")
    assert s.due(later).fires == ()
    assert s.next_fire("job", later) is None
    again = one(state, at, "2026-12-05T00:00:00+00:00")
    assert again.due(later).fires == ()
    assert again.next_fire("job", T("2026-11-01T00:00:00+00:00")) is None


@pytest.mark.parametrize(
    ("misfire", "now", "fired", "skipped"),
    [
        ("run_once", "2026-12-01T00:05:00+00:00", 1, 0),
        ("skip", "2026-12-01T00:05:00+00:00", 1, 0),
        ("run_once", "2026-12-02T00:00:00+00:00", 1, 0),
        ("skip", "2026-12-02T00:00:00+00:00", 0, 1),
    ],
    ids=[
        "within grace it runs late",
        "within grace it runs late under skip too",
        "beyond grace run_once still runs it",
        "beyond grace skip drops it",
    ],
)
def test_at_accepted_after_its_time_follows_the_misfire_policy(
    state: Path, misfire: Any, now: str, fired: int, skipped: int
) -> None:
    at = Schedule(at=T("2026-12-01T00:00:00+00:00"), misfire=misfire, grace=600)
    s = one(state, at, "2026-12-01T00:01:00+00:00")
    due = s.due(T(now))
    assert (len(due.fires), len(due.skipped)) == (fired, skipped)


# -- every -------------------------------------------------------------------------------


def test_every_keeps_its_grid_across_a_restart(state: Path) -> None:
    s = one(state, every(900), "2026-11-23T10:00:07+00:00")
    assert s.next_fire("job", T("2026-11-23T10:00:07+00:00")) == T("2026-11-23T10:15:07+00:00")
    fires = s.due(T("2026-11-23T10:15:08+00:00")).fires
    assert [f.fire_time.isoformat() for f in fires] == ["2026-11-23T10:15:07+00:00"]
    s.record("job", fires[0].fire_time)

    restarted = one(state, every(900), "2026-11-23T10:20:00+00:00")
    assert restarted.due(T("2026-11-23T10:20:00+00:00")).fires == ()
    assert restarted.next_fire("job", T("2026-11-23T10:20:00+00:00")) == T(
        "2026-11-23T10:30:07+00:00"
    )


def test_every_first_fires_one_interval_after_acceptance(state: Path) -> None:
    s = one(state, every(0.5), "2026-11-23T10:00:00.250000+00:00")
    assert s.due(T("2026-11-23T10:00:00.600000+00:00")).fires == ()
    [f] = s.due(T("2026-11-23T10:00:00.750000+00:00")).fires
    assert f.fire_time == T("2026-11-23T10:00:00.750000+00:00")


# -- misfires ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("misfire", "now", "fires", "skipped", "misfires"),
    [
        ("run_once", "2026-11-23T02:05:00+00:00", [("2026-11-23T02:00:00+00:00", 0)], [], 0),
        ("skip", "2026-11-23T02:05:00+00:00", [("2026-11-23T02:00:00+00:00", 0)], [], 0),
        ("run_once", "2026-11-23T05:30:00+00:00", [("2026-11-23T05:00:00+00:00", 3)], [], 4),
        ("skip", "2026-11-23T05:30:00+00:00", [], ["2026-11-23T05:00:00+00:00"], 4),
        ("run_once", "2026-11-23T02:30:00+00:00", [("2026-11-23T02:00:00+00:00", 0)], [], 1),
        ("skip", "2026-11-23T02:30:00+00:00", [], ["2026-11-23T02:00:00+00:00"], 1),
        ("run_once", "2026-11-23T05:05:00+00:00", [("2026-11-23T05:00:00+00:00", 3)], [], 3),
        ("skip", "2026-11-23T05:05:00+00:00", [("2026-11-23T05:00:00+00:00", 0)], [], 3),
    ],
    ids=[
        "late within grace runs with missed=0",
        "late within grace runs under skip too",
        "outage beyond grace: run_once makes one fire for all",
        "outage beyond grace: skip makes none and counts them",
        "one fire beyond grace: run_once runs it and counts one misfire",
        "one fire beyond grace: skip drops it and counts one misfire",
        "outage ending within grace: run_once's newest stands for the older",
        "outage ending within grace: skip runs the newest alone",
    ],
)
def test_missed_fires_follow_the_misfire_policy(
    state: Path,
    misfire: Any,
    now: str,
    fires: list[tuple[str, int]],
    skipped: list[str],
    misfires: int,
) -> None:
    s = one(state, every(3600, misfire=misfire, grace=600), "2026-11-23T01:00:00+00:00")
    s.record("job", T("2026-11-23T01:00:00+00:00"))
    due = s.due(T(now))
    assert [(f.fire_time.isoformat(), f.missed) for f in due.fires] == fires
    assert [(n, t.isoformat()) for n, t in due.skipped] == [("job", t) for t in skipped]
    assert due.misfires == misfires


def test_within_grace_older_fires_coalesce_into_the_newest(state: Path) -> None:
    s = one(state, every(60, grace=3600), "2026-11-23T10:00:00+00:00")
    due = s.due(T("2026-11-23T10:03:30+00:00"))
    assert [(f.fire_time.isoformat(), f.missed) for f in due.fires] == [
        ("2026-11-23T10:03:00+00:00", 2)
    ]
    assert due.misfires == 2


def test_misfires_are_told_per_schedule_so_each_counts_once_recorded(state: Path) -> None:
    s = one(state, every(3600, grace=60), "2026-11-23T00:00:00+00:00", name="a")
    s.set("b", every(3600, misfire="skip", grace=60), T("2026-11-23T00:00:00+00:00"))
    s.set("c", every(7200, grace=60), T("2026-11-23T05:00:00+00:00"))
    due = s.due(T("2026-11-23T05:30:00+00:00"))
    assert due.misfired == {"a": 5, "b": 5}  # c has not fired yet
    assert due.misfires == 10
    s.record("b", T("2026-11-23T05:00:00+00:00"))  # a's fire not recorded: its run failed
    assert s.due(T("2026-11-23T05:31:00+00:00")).misfired == {"a": 5}


def test_recorded_skip_is_not_counted_again(state: Path) -> None:
    s = one(state, every(3600, misfire="skip", grace=60), "2026-11-23T00:00:00+00:00")
    now = T("2026-11-23T05:30:00+00:00")
    [(name, newest)] = s.due(now).skipped
    s.record(name, newest)
    assert s.due(now) == s.due(now + timedelta(minutes=1))
    assert s.due(now).misfires == 0
    assert s.next_fire("job", now) == T("2026-11-23T06:00:00+00:00")


@pytest.mark.parametrize(
    ("schedule", "limit"),
    [
        (every(1, grace=60), 0.1),
        # 1001 CronTrigger steps (~25 ms here); enumerating the year would take ~25 s
        (cron("* * * * *", grace=60), 0.5),
        (cron("0 0 * * *", grace=60), 0.1),
    ],
    ids=["every 1s", "cron every minute", "cron daily"],
)
def test_a_year_long_outage_answers_in_milliseconds(
    state: Path, schedule: Schedule, limit: float
) -> None:
    s = one(state, schedule, "2025-11-23T00:00:00+00:00")
    now = T("2026-11-23T00:00:00.500000+00:00")
    started = time.perf_counter()
    due = s.due(now)
    elapsed = time.perf_counter() - started
    [f] = due.fires
    assert f.fire_time == T("2026-11-23T00:00:00+00:00")
    assert elapsed < limit, f"due() took {elapsed * 1000:.0f} ms for a year-long outage"
    if schedule.cron == "0 0 * * *":
        assert (f.missed, f.missed_text, due.misfires) == (364, "364", 364)
    else:
        assert (f.missed, f.missed_text, due.misfires) == (MISSED_CAP, "1000+", MISSED_CAP)


def test_a_cron_outage_past_the_cap_still_fires_the_newest_time(state: Path) -> None:
    s = one(state, cron("*/7 * * * *", grace=60), "2026-01-01T00:00:00+00:00")
    [f] = s.due(T("2026-11-23T10:15:30+00:00")).fires
    assert f.fire_time == T("2026-11-23T10:14:00+00:00")
    assert f.missed_text == "1000+"


# -- clock jumps -------------------------------------------------------------------------


def test_a_backward_clock_jump_does_not_fire_the_same_time_twice(state: Path) -> None:
    s = one(state, cron("0 * * * *", grace=600), "2026-11-23T00:30:00+00:00")
    [f] = s.due(T("2026-11-23T03:00:00+00:00")).fires
    s.record("job", f.fire_time)
    for back in ("2026-11-23T02:30:00+00:00", "2026-11-23T03:00:00+00:00"):
        assert s.due(T(back)).fires == ()
    assert s.next_fire("job", T("2026-11-23T02:30:00+00:00")) == T("2026-11-23T04:00:00+00:00")
    assert [x.fire_time for x in s.due(T("2026-11-23T04:00:00+00:00")).fires] == [
        T("2026-11-23T04:00:00+00:00")
    ]


def test_a_forward_clock_jump_is_a_long_outage(state: Path) -> None:
    s = one(state, cron("0 * * * *", grace=600), "2026-11-23T00:30:00+00:00")
    [f] = s.due(T("2026-11-25T07:20:00+00:00")).fires
    assert (f.fire_time, f.missed) == (T("2026-11-25T07:00:00+00:00"), 54)


# -- persistence -------------------------------------------------------------------------


def test_record_replaces_the_state_file_atomically_and_survives_a_restart(state: Path) -> None:
    s = one(state, cron("0 2 * * *", "Asia/Shanghai"), "2026-11-22T00:00:00+00:00")
    path = state / STATE_FILE
    inode = path.stat().st_ino
    s.record("job", T("2026-11-23T02:00:00+08:00"))
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert [p.name for p in state.iterdir()] == [STATE_FILE]
    assert orjson.loads(path.read_bytes()) == {
        "job": {
            "last_fire": "2026-11-22T18:00:00+00:00",
            "anchor": "2026-11-22T00:00:00+00:00",
            "trigger": "cron 0 2 * * * Asia/Shanghai",
        }
    }
    restarted = one(state, cron("0 2 * * *", "Asia/Shanghai"), "2026-11-23T00:00:00+00:00")
    assert restarted.due(T("2026-11-22T18:30:00+00:00")).fires == ()
    assert restarted.next_fire("job", T("2026-11-22T18:30:00+00:00")) == T(
        "2026-11-24T02:00:00+08:00"
    )


def test_due_is_pure_and_writes_nothing(state: Path) -> None:
    s = one(state, every(60), "2026-11-23T10:00:00+00:00")
    before = (state / STATE_FILE).read_bytes()
    now = T("2026-11-23T10:05:00+00:00")
    assert s.due(now) == s.due(now)
    assert (state / STATE_FILE).read_bytes() == before


@pytest.mark.parametrize(
    ("replacement", "anchor", "kept_last_fire"),
    [
        (every(900, misfire="skip", grace=60, overlap="allow"), "2026-11-23T10:00:07", True),
        (every(600), "2026-11-23T12:00:00", False),
        (cron("*/15 * * * *"), "2026-11-23T12:00:00", False),
    ],
    ids=[
        "same interval, other policies: anchor and last fire kept",
        "other interval: grid restarts at acceptance",
        "now a cron: starts afresh",
    ],
)
def test_set_keeps_or_resets_the_anchor(
    state: Path, replacement: Schedule, anchor: str, kept_last_fire: bool
) -> None:
    s = one(state, every(900), "2026-11-23T10:00:07+00:00")
    s.record("job", T("2026-11-23T11:45:07+00:00"))
    s.set("job", replacement, T("2026-11-23T12:00:00+00:00"))
    saved = orjson.loads((state / STATE_FILE).read_bytes())["job"]
    assert saved["anchor"] == anchor + "+00:00"
    assert (saved["last_fire"] is not None) == kept_last_fire
    restarted = one(state, replacement, "2026-11-23T13:00:00+00:00")
    assert orjson.loads((state / STATE_FILE).read_bytes())["job"] == saved
    assert restarted.names() == ["job"]


def test_remove_and_retain_forget_a_schedule(state: Path) -> None:
    s = Schedules(state)
    for name in ("a", "b", "c"):
        s.set(name, every(60), T("2026-11-23T10:00:00+00:00"))
    assert s.remove("a") is True
    assert s.remove("a") is False
    assert s.names() == ["b", "c"]

    restarted = Schedules(state)
    assert restarted.names() == []  # known from disk, active once set again
    restarted.set("b", every(60), T("2026-11-23T11:00:00+00:00"))
    assert restarted.retain(["b"]) == ["c"]
    assert sorted(orjson.loads((state / STATE_FILE).read_bytes())) == ["b"]
    assert restarted.next_fire("b", T("2026-11-23T11:00:30+00:00")) == T(
        "2026-11-23T11:01:00+00:00"
    )
    with pytest.raises(KeyError):
        restarted.next_fire("a", T("2026-11-23T11:00:30+00:00"))


def test_a_held_fire_is_recorded_and_kept_across_a_restart_until_released(state: Path) -> None:
    s = one(state, cron("0 * * * *", "Asia/Shanghai", overlap="queue"), "2026-11-23T00:00:00Z")
    [fire] = s.due(T("2026-11-23T03:00:10+00:00")).fires
    assert s.held("job") is None
    s.hold(fire)
    assert s.due(T("2026-11-23T03:00:20+00:00")).fires == ()  # recorded by the same write
    saved = orjson.loads((state / STATE_FILE).read_bytes())["job"]
    assert saved["held"] == {"fire_time": "2026-11-23T03:00:00+00:00", "missed": 2}
    assert saved["last_fire"] == "2026-11-23T03:00:00+00:00"

    restarted = Schedules(state)
    assert restarted.held("job") is None  # known from disk, active once set again
    restarted.set(
        "job", cron("0 * * * *", "Asia/Shanghai", overlap="queue"), T("2026-11-24T00:00:00Z")
    )
    assert restarted.held("job") == fire  # same zone, trigger, missed count: same run id
    restarted.release("job")
    assert restarted.held("job") is None
    assert "held" not in orjson.loads((state / STATE_FILE).read_bytes())["job"]


def test_a_new_trigger_drops_the_held_fire_of_the_old_one(state: Path) -> None:
    s = one(state, every(60, overlap="queue"), "2026-11-23T10:00:00+00:00")
    [fire] = s.due(T("2026-11-23T10:01:00+00:00")).fires
    s.hold(fire)
    s.set("job", every(60, overlap="skip"), T("2026-11-23T10:01:30+00:00"))
    assert s.held("job") == fire  # same trigger, another overlap: still held
    assert s.take_dropped() == []
    s.set("job", every(120, overlap="queue"), T("2026-11-23T10:01:40+00:00"))
    assert s.held("job") is None
    assert "held" not in orjson.loads((state / STATE_FILE).read_bytes())["job"]
    assert s.take_dropped() == [("job", fire.fire_time)]  # the daemon ends a half-made run
    assert s.take_dropped() == []


@pytest.mark.parametrize("how", ["remove", "retain"])
def test_a_held_fire_let_go_with_its_schedule_is_listed_once(state: Path, how: str) -> None:
    s = one(state, every(60), "2026-11-23T10:00:00+00:00")
    s.set("other", every(60), T("2026-11-23T10:00:00+00:00"))
    [fire, other] = sorted(s.due(T("2026-11-23T10:01:00+00:00")).fires, key=lambda f: f.name)
    s.hold(fire)
    s.record("other", other.fire_time)  # recorded, not held: nothing to let go
    if how == "remove":
        s.remove("job")
        s.remove("other")
    else:
        s = Schedules(state)  # a restart: the files went while the daemon was down
        assert s.retain([]) == ["job", "other"]
    assert s.take_dropped() == [("job", fire.fire_time)]
    assert s.take_dropped() == []


def test_a_state_file_that_cannot_be_written_is_one_error_and_written_later(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = one(state, every(60), "2026-11-23T10:00:00+00:00")
    shutil.rmtree(state)
    state.write_text("a file where the state folder should be")
    s.record("job", T("2026-11-23T10:01:00+00:00"))  # no exception: the loop goes on
    s.record("job", T("2026-11-23T10:02:00+00:00"))
    assert s.unsaved
    assert s.due(T("2026-11-23T10:02:30+00:00")).fires == ()  # memory has both records
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1  # not one per write
    assert errors[0].startswith(f"{state / STATE_FILE}: cannot write (")
    state.unlink()
    s.save()
    assert not s.unsaved
    saved = orjson.loads((state / STATE_FILE).read_bytes())["job"]
    assert saved["last_fire"] == "2026-11-23T10:02:00+00:00"


@pytest.mark.parametrize(
    "held",
    [{"fire_time": "2026-11-23T10:01:00", "missed": 0}, {"fire_time": "2026-11-23T10:01:00Z"}],
    ids=["a time without zone", "no missed count"],
)
def test_a_bad_held_fire_is_dropped_alone(
    state: Path, caplog: pytest.LogCaptureFixture, held: dict[str, Any]
) -> None:
    state.mkdir()
    entry = {
        "last_fire": "2026-11-23T10:01:00+00:00",
        "anchor": "2026-11-23T10:00:00+00:00",
        "trigger": "every 1m",
        "held": held,
    }
    (state / STATE_FILE).write_bytes(orjson.dumps({"job": entry}))
    s = one(state, every(60, overlap="queue"), "2026-11-23T12:00:00+00:00")
    assert s.held("job") is None
    assert s.next_fire("job", T("2026-11-23T10:01:30+00:00")) == T("2026-11-23T10:02:00+00:00")
    [record] = caplog.records
    assert record.getMessage().startswith(f"{state / STATE_FILE}: held fire of 'job' unreadable")


def test_an_unreadable_state_file_is_one_error_and_a_fresh_start(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state.mkdir()
    (state / STATE_FILE).write_bytes(b"{not json")
    s = Schedules(state)
    assert s.names() == []
    [record] = caplog.records
    assert record.levelname == "ERROR"
    assert record.getMessage().startswith(f"{state / STATE_FILE}: cannot read (")
    assert record.getMessage().endswith("); schedules start without recorded fires")


def test_a_naive_now_is_refused(state: Path) -> None:
    s = one(state, every(60), "2026-11-23T10:00:00+00:00")
    with pytest.raises(ValueError, match="has no time zone; pass an aware datetime"):
        s.due(datetime(2026, 11, 23, 10, 5))


# -- listing, run ids, overlap -----------------------------------------------------------


def test_listing_prints_trigger_and_next_fire_in_the_schedule_zone(state: Path) -> None:
    s = Schedules(state)
    accepted = T("2026-11-23T10:00:00+00:00")
    s.set("nightly-etl", cron("0 2 * * *", "Asia/Shanghai"), accepted)
    s.set("poll", every(900), accepted)
    s.set("once", Schedule(at=T("2026-12-01T02:00:00+08:00"), timezone="Asia/Shanghai"), accepted)
    s.set("gone", Schedule(at=T("2026-11-01T00:00:00+00:00")), accepted)
    s.record("gone", T("2026-11-01T00:00:00+00:00"))
    assert s.listing(T("2026-11-23T10:05:00+00:00")) == [
        ("gone", "at 2026-11-01T00:00:00+00:00", None),
        ("nightly-etl", "cron 0 2 * * * Asia/Shanghai", "2026-11-24T02:00:00+08:00"),
        ("once", "at 2026-12-01T02:00:00+08:00", "2026-12-01T02:00:00+08:00"),
        ("poll", "every 15m", "2026-11-23T10:15:00+00:00"),
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(86400 * 2, "2d"), (3600, "1h"), (90, "90s"), (0.5, "500ms"), (5400, "90m")],
    ids=["days", "hours", "seconds", "milliseconds", "minutes"],
)
def test_listing_every_uses_the_largest_exact_unit(state: Path, seconds: float, text: str) -> None:
    s = one(state, every(seconds), "2026-11-23T10:00:00+00:00")
    assert s.listing(T("2026-11-23T10:00:00+00:00"))[0][1] == f"every {text}"


def test_run_id_is_keyed_by_name_and_fire_time(state: Path) -> None:
    nightly = cron("0 2 * * *", "Asia/Shanghai")
    now = T("2026-11-22T18:00:00+00:00")
    [a] = one(state, nightly, "2026-11-22T00:00:00+00:00", "nightly-etl").due(now).fires
    [b] = one(state, nightly, "2026-11-22T00:00:00+00:00", "nightly-etl").due(now).fires
    assert a.run_id() == b.run_id() == "20261122_180000_107435"
    assert hashlib.sha256(b"nightly-etl").hexdigest().startswith("107435")
    utc_twin = Fire("nightly-etl", T("2026-11-22T18:00:00+00:00"), "cron", 0, "2026-11-22")
    assert utc_twin.run_id() == a.run_id()
    assert (a.run_date, a.trigger, a.missed) == ("2026-11-23", "cron", 0)


@pytest.mark.parametrize(
    ("policy", "running", "pending", "decision"),
    [
        ("allow", False, False, "run"),
        ("allow", True, True, "run"),
        ("skip", False, False, "run"),
        ("skip", True, False, "skip"),
        ("queue", False, False, "run"),
        ("queue", True, False, "queue"),
        ("queue", True, True, "skip"),
    ],
    ids=[
        "allow when idle",
        "allow while running",
        "skip when idle runs",
        "skip while running",
        "queue when idle runs",
        "queue while running keeps one pending",
        "queue with one pending drops the second",
    ],
)
def test_overlap_decision(policy: str, running: bool, pending: bool, decision: str) -> None:
    assert overlap_decision(policy, running, pending) == decision
