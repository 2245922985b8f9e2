"""Crontab lines as fire instants in a time zone, daylight saving resolved as documented.

Owns: reading a crontab line (five fields, weekdays numbered as crontab numbers them) and
mapping the wall-clock times it matches to instants in the schedule's zone. Not here: the
other triggers and how many fires are due (chute.scheduling.triggers), checking a spec's
`cron:` field (chute.spec.fields, which uses `crontab_weekdays`).

APScheduler 3.x's CronTrigger matches the fields, in UTC, which has no gap or repeat, with
an explicit start_date, so it never reads the clock or the local zone. chute maps each wall
time to an instant itself, because APScheduler does that wrongly for us: a nonexistent
time (the skipped hour) fires at the shifted instant (02:30 -> 03:30) or, at the very
start of the gap, not at all that day; a repeated time fires twice. Here a nonexistent time
fires once at the first instant after the gap, a repeated one once, at its first
occurrence (docs/file-format.md, Schedules). Weekdays count as crontab does (0 and 7 =
Sunday; APScheduler 3.x counts 0 = Monday), and a restricted day of month and weekday both
match ("0 0 1 * 1": the 1st, and Mondays), as in Vixie cron.
Diagnostics: a field that cannot be read raises ValueError saying what is expected (the
validator has refused such a spec before it gets here).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo

from apscheduler.triggers.cron import CronTrigger

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab numbering: 0 = sun
WEEKDAY_HINT = "0-7 (0 and 7 are Sunday) or sun, mon, tue, wed, thu, fri, sat"


def crontab_weekdays(field: str) -> str:
    """A crontab weekday field as APScheduler 3.x's day_of_week (names, so 0 stays Sunday).

    `0`, `7` -> `sun`; `1-5` -> `mon,tue,wed,thu,fri`; `*/2` -> `sun,tue,thu,sat`.
    """
    days: set[int] = set()
    for part in field.split(","):
        span, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"step {step_text!r} in {part!r}; expected a number from 1")
            step = int(step_text)
        if span == "*":
            lo, hi = 0, 6
        elif "-" in span:
            first, last = span.split("-", 1)
            lo, hi = _weekday(first), _weekday(last)
            if hi == 0 and lo > 0:
                hi = 7  # fri-sun
            if lo > hi:
                raise ValueError(f"range {span!r} runs backwards; expected a range within 0-7")
        else:
            lo = _weekday(span)
            hi = 6 if slash else lo
        days.update(d % 7 for d in range(lo, hi + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(_WEEKDAYS[d] for d in sorted(days))


def _weekday(text: str) -> int:
    if text.isdigit() and int(text) <= 7:
        return int(text)
    if text.lower() in _WEEKDAYS:
        return _WEEKDAYS.index(text.lower())
    raise ValueError(f"{text!r} is not a weekday; expected {WEEKDAY_HINT}")


class Cron:
    """Fire instants of a crontab line in a zone, daylight saving resolved as documented."""

    def __init__(self, expr: str, zone: tzinfo) -> None:
        parts = expr.split()
        if len(parts) != 5:
            raise ValueError(f"{expr!r} has {len(parts)} fields; expected 5")
        minute, hour, dom, month, dow = parts
        weekdays = crontab_weekdays(dow)
        if dom.startswith("*") or dow.startswith("*"):
            days = [(dom, weekdays)]
        else:  # both restricted: either matches
            days = [(dom, "*"), ("*", weekdays)]
        # Wall-clock times are matched in UTC, which has no gap or repeat; _instant maps them.
        self._triggers = [
            CronTrigger(
                minute=minute,
                hour=hour,
                day=d,
                month=month,
                day_of_week=w,
                timezone=UTC,
                start_date=_EPOCH,
            )
            for d, w in days
        ]
        self.zone = zone
        self._never = self._next_wall(datetime(2000, 1, 1)) is None  # "0 0 30 2 *"

    def _next_wall(self, wall: datetime) -> datetime | None:
        """The first matching wall time after `wall` (naive)."""
        start = (wall + _US).replace(tzinfo=UTC)
        found = [t.get_next_fire_time(None, start) for t in self._triggers]
        times = [f.replace(tzinfo=None) for f in found if f is not None]
        return min(times) if times else None

    def _instant(self, wall: datetime) -> datetime:
        early = wall.replace(tzinfo=self.zone, fold=0)
        late = wall.replace(tzinfo=self.zone, fold=1)
        first, second = sorted((early.astimezone(UTC), late.astimezone(UTC)))
        if first == second or first.astimezone(self.zone).replace(tzinfo=None) == wall:
            return first.astimezone(self.zone)  # exists once, or twice: its first occurrence
        # In a gap: `first` is still before the transition, `second` after it; find it.
        lo, hi = first, second
        before = first.astimezone(self.zone).utcoffset()
        while hi - lo > timedelta(seconds=1):
            mid = lo + (hi - lo) / 2
            if mid.astimezone(self.zone).utcoffset() == before:
                lo = mid
            else:
                hi = mid
        return hi.replace(microsecond=0).astimezone(self.zone)

    def next_after(self, after: datetime) -> datetime | None:
        if self._never:
            return None
        wall: datetime | None = after.astimezone(self.zone).replace(tzinfo=None)
        while wall is not None:
            wall = self._next_wall(wall)
            if wall is None:
                return None
            instant = self._instant(wall)
            if instant > after:  # not so in a repeated hour's second pass
                return instant
        return None

    def newest_until(self, lo: datetime, now: datetime) -> datetime:
        """The last fire time <= now, given `lo`, a fire time <= now: bisection, so a long
        outage costs a few dozen `next_after`s, not one per missed fire."""
        hi = now  # no fire time in (hi, now]
        while True:
            nxt = self.next_after(lo)
            if nxt is None or nxt > hi:
                return lo
            mid = lo + (hi - lo) / 2
            found = self.next_after(mid)
            if found is not None and found <= hi:
                lo = found
            else:
                hi = mid
