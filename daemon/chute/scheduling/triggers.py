"""When a schedule fires: the fire times of its cron, every or at trigger, and how many are due.

Owns: a `schedule:` block's fire times, as answers to pure questions that take the times
they depend on (`now`, the anchor, the last fire) as arguments: the first fire time after
a given time, and the fire times due by `now` since the last fire (how many, and the
newest). Not here: what a due fire becomes and the state of each schedule
(chute.scheduling.schedules), crontab arithmetic and daylight saving
(chute.scheduling.cron), parsing and validating the block (chute.spec).
- cron: chute.scheduling.cron. Counting due fire times walks them one by one up to
  MISSED_CAP, then finds the newest by bisection: a long outage or a forward clock jump
  costs no more than MISSED_CAP + 1 steps (APScheduler's own catch-up enumerates every
  missed fire first and hangs on them: apscheduler #526, #1066).
- every: D: fires at anchor + k*D (k >= 1) in integer microseconds, so missed fires are
  counted in O(1) (IntervalTrigger can only answer "next", in float seconds).
- at: one fire, due once its time has come and until it is recorded, even when the file
  was accepted after that time (misfire rules apply: a one-time job never vanishes
  silently).
Diagnostics: a block with no trigger, or a cron line that cannot be read, raises ValueError
(the validator has refused such a spec before it gets here).
Limits: due fire times are counted up to MISSED_CAP + 1; the count reads "1000+" beyond.
"""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo

from chute.spec.model import Schedule

from .cron import Cron

MISSED_CAP = 1000  # missed fires counted at most; more reads "1000+"
TriggerType = Literal["cron", "at", "every"]

_US = timedelta(microseconds=1)


def trigger_text(schedule: Schedule) -> str:
    """`cron 0 2 * * * Asia/Shanghai`, `every 15m`, `at 2026-12-01T02:00:00+08:00`."""
    if schedule.cron is not None:
        return f"cron {schedule.cron} {schedule.timezone}"
    if schedule.every is not None:
        return f"every {_duration_text(schedule.every)}"
    if schedule.at is not None:
        return f"at {schedule.at.isoformat()}"
    raise ValueError("a schedule takes exactly one of cron, at or every")


def _duration_text(seconds: float) -> str:
    ms = round(seconds * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


class Trigger:
    """The fire times of one `schedule:` block, in its zone. `anchor` is when the schedule
    was accepted (an `every` grid starts there); `last_fire` the newest fire recorded."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.text = trigger_text(schedule)  # a changed text is a new trigger
        self.zone: tzinfo = ZoneInfo(schedule.timezone)
        self.kind: TriggerType = (
            "cron" if schedule.cron is not None else "every" if schedule.every is not None else "at"
        )
        self._cron = Cron(schedule.cron, self.zone) if schedule.cron is not None else None

    def next_after(
        self, after: datetime, anchor: datetime, last_fire: datetime | None
    ) -> datetime | None:
        """The first fire time strictly after `after`, not counting what is recorded."""
        s = self.schedule
        if self._cron is not None:
            return self._cron.next_after(after)
        if s.every is not None:
            step = _every_us(s.every)
            k = max(1, (after - anchor) // _US // step + 1)
            return (anchor + k * step * _US).astimezone(self.zone)
        assert s.at is not None
        at = _aware(s.at, self.zone)
        return at.astimezone(self.zone) if at > after and last_fire is None else None

    def due_count(
        self, now: datetime, anchor: datetime, last_fire: datetime | None
    ) -> tuple[int, datetime] | None:
        """(how many fire times are due, up to MISSED_CAP + 1; the newest one), or None."""
        s = self.schedule
        if s.at is not None:
            at = _aware(s.at, self.zone)
            return (1, at.astimezone(self.zone)) if last_fire is None and at <= now else None
        base = anchor if last_fire is None else max(anchor, last_fire)
        if s.every is not None:
            step = _every_us(s.every)
            first = max(1, (base - anchor) // _US // step + 1)
            last = (now - anchor) // _US // step
            if last < first:
                return None
            latest = (anchor + last * step * _US).astimezone(self.zone)
            return min(last - first + 1, MISSED_CAP + 1), latest
        assert self._cron is not None
        count = 0
        newest: datetime | None = None
        t: datetime | None = self._cron.next_after(base)
        while t is not None and t <= now:
            count, newest = count + 1, t
            if count > MISSED_CAP:
                return count, self._cron.newest_until(t, now)
            t = self._cron.next_after(t)
        return None if newest is None else (count, newest)


def _every_us(seconds: float) -> int:
    return max(1, round(seconds * 1_000_000))


def _aware(dt: datetime, zone: tzinfo) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=zone)
