"""The schedules table: each active schedule, its last fire and held fire, and what is due.

Owns: which schedules are active, their anchors (when each was accepted), their last
fires and the fire `overlap: queue` holds, the misfire decisions (what a fire later than
`grace` becomes), and `<state>/schedules.json` ({name: {"last_fire", "anchor", "trigger"}},
plus "held": {"fire_time", "missed"} while a fire is held), and the overlap rule (what a
due fire does while its schedule's previous run may still run: `overlap_decision`).
Not here: fire times (chute.scheduling.triggers, chute.scheduling.cron), reading
schedules/ (chute.store.spool), creating runs (chute.daemon.fires), the loop that sleeps
until `next_wakeup` (the daemon), parsing and validating the block (chute.spec).

chute runs its own step loop instead of APScheduler's BackgroundScheduler, whose loop
sleeps past fire times after a backward clock jump (apscheduler #339) and whose default
misfire grace is 1 s. Here every answer takes `now` (timezone-aware) as an argument.

Exactly once: `due(now)` proposes at most one fire per schedule, keyed by (name, fire
time) through its deterministic `run_id`. A fire that is to run is recorded and held in
one write (`hold`) before the daemon makes its run, and `release`d once that run is
queued; a fire `overlap: queue` keeps waiting is held the same way. So a crash while a run
is being made leaves its fire held, and the daemon finishes that same run at the next
start, even when newer fire times are due by then (`due` would propose the newest of them
instead, and the half-made run would be left queued for ever). A skipped fire is just
`record`ed. `due` never proposes a fire time at or before the recorded last fire, so a
backward clock jump cannot fire one twice. A held fire that `set` (a changed trigger),
`remove` or `retain` lets go is listed by `take_dropped`: the daemon ends a run a crash
left half made for it.
Crash safety: schedules.json is replaced atomically (chute.store.atomic.write_json) by `set`
(new or changed schedule), `record`, `hold`, `release`, `remove` and `retain`.
Diagnostics: an unreadable schedules.json is an environment problem: one ERROR line, and
the schedules start without recorded fires (a fire the runs/ folder already holds keeps
its run id, so it does not run twice). One that cannot be written (a full disk) is one
ERROR line too: the schedules go on from memory, `unsaved` says so, and every later write
(each fire, or `save`) tries again; a crash meanwhile falls back on the run ids as above.
Invalid schedules are the validator's job; here they raise ValueError.
Limits: run ids have whole seconds, so two fires of one schedule within the same second
(every: below 1s) share one run. One writer per state folder: the daemon.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

from chute.spec.model import Schedule
from chute.store.atomic import write_json

from .triggers import MISSED_CAP, Trigger, TriggerType

log = logging.getLogger(__name__)

STATE_FILE = "schedules.json"
Decision = Literal["run", "skip", "queue"]


@dataclass(frozen=True, slots=True)
class Fire:
    name: str
    fire_time: datetime  # the scheduled time, aware, in the schedule's zone
    trigger: TriggerType  # run.json trigger.type
    missed: int  # earlier fire times this one stands for (run_once); MISSED_CAP means "1000+"
    run_date: str  # YYYY-MM-DD of fire_time in the schedule's zone: CHUTE_RUN_DATE

    def run_id(self) -> str:
        return fire_run_id(self.name, self.fire_time)

    @property
    def missed_text(self) -> str:
        return f"{MISSED_CAP}+" if self.missed >= MISSED_CAP else str(self.missed)


@dataclass(frozen=True, slots=True)
class Due:
    """What one step of the loop does. Record every fire and every skipped one."""

    fires: tuple[Fire, ...]  # run each now (overlap permitting), then record it
    skipped: tuple[tuple[str, datetime], ...]  # (name, newest missed time), misfire: skip
    misfired: dict[str, int]  # per schedule: fire times that get no run of their own

    @property
    def misfires(self) -> int:
        """chute_schedule_misfires_total's share, once every fire and skip is recorded."""
        return sum(self.misfired.values())


def fire_run_id(name: str, fire_time: datetime) -> str:
    """The run id of a fire: `20261122_101500_a1b2c3`, its time in UTC, then
    sha256(name)[:6]."""
    stamp = fire_time.astimezone(UTC).strftime("%Y%m%d_%H%M%S")
    return f"{stamp}_{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def overlap_decision(policy: str, previous_running: bool, fire_pending: bool) -> Decision:
    """What a fire does while the schedule's previous run may still run.

    `queue` keeps at most one pending fire: a second one while one is pending is skipped.
    """
    if policy == "allow" or not previous_running:
        return "run"
    if policy == "skip":
        return "skip"
    if policy == "queue":
        return "skip" if fire_pending else "queue"
    raise ValueError(f"overlap {policy!r}; expected skip, queue or allow")


def rfc3339_local(dt: datetime) -> str:
    """`2026-11-24T02:00:00+08:00`: the offset of dt's own zone, milliseconds when present."""
    return dt.isoformat(timespec="milliseconds" if dt.microsecond else "seconds")


@dataclass(slots=True)
class _Entry:
    trigger: Trigger | None  # None: state loaded from disk, not set in this process yet
    text: str  # the trigger's text, as saved: a changed trigger resets anchor and last fire
    anchor: datetime
    last_fire: datetime | None
    held: tuple[datetime, int] | None = None  # (fire time, missed): its run is not queued yet

    def fire(self, name: str, fire_time: datetime, missed: int) -> Fire:
        assert self.trigger is not None
        local = fire_time.astimezone(self.trigger.zone)
        return Fire(name, local, self.trigger.kind, missed, local.date().isoformat())

    def mark(self, fire_time: datetime) -> bool:
        """Make `fire_time` the last fire; False when an equal or later one is recorded."""
        if self.last_fire is not None and self.last_fire >= fire_time:
            return False
        self.last_fire = fire_time.astimezone(UTC)
        return True


def _check_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now={now.isoformat()} has no time zone; pass an aware datetime")


class Schedules:
    """Every active schedule of one daemon, and the last fire of each (state_dir/schedules.json)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self._entries: dict[str, _Entry] = {}
        for name, raw in self._load().items():
            try:
                last = raw["last_fire"]
                self._entries[name] = _Entry(
                    trigger=None,
                    text=str(raw["trigger"]),
                    anchor=datetime.fromisoformat(raw["anchor"]),
                    last_fire=None if last is None else datetime.fromisoformat(last),
                    held=self._read_held(name, raw.get("held")),
                )
            except (KeyError, TypeError, ValueError) as e:
                log.error(
                    "%s: entry %r unreadable (%s); forgetting its last fire", self.path, name, e
                )
        self.unsaved = False  # the last write failed: memory is ahead of the file
        self._dropped: list[tuple[str, datetime]] = []  # held fires let go: take_dropped

    def _read_held(self, name: str, held: Any) -> tuple[datetime, int] | None:
        """A held fire as saved; a bad one is dropped alone (the last fire stays)."""
        if held is None:
            return None
        try:
            fire_time, missed = datetime.fromisoformat(held["fire_time"]), held["missed"]
            if fire_time.utcoffset() is None or type(missed) is not int or missed < 0:
                raise ValueError(f"{held!r} is not an aware time and a count")
        except (KeyError, TypeError, ValueError) as e:
            log.error("%s: held fire of %r unreadable (%s); dropping it", self.path, name, e)
            return None
        return fire_time, missed

    def _load(self) -> dict[str, Any]:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as e:
            log.error("%s: cannot read (%s); schedules start without recorded fires", self.path, e)
            return {}
        if not isinstance(data, dict):
            log.error("%s: not a JSON object; schedules start without recorded fires", self.path)
            return {}
        return data

    def save(self) -> None:
        """Write the state file from memory (each change does; call it again after a write
        that failed: `unsaved`)."""
        data: dict[str, dict[str, object]] = {}
        for name, e in sorted(self._entries.items()):
            data[name] = {
                "last_fire": None
                if e.last_fire is None
                else e.last_fire.astimezone(UTC).isoformat(),
                "anchor": e.anchor.astimezone(UTC).isoformat(),
                "trigger": e.text,
            }
            if e.held is not None:
                fire_time, missed = e.held
                data[name]["held"] = {
                    "fire_time": fire_time.astimezone(UTC).isoformat(),
                    "missed": missed,
                }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, data)  # hands over: a new anchor, or a fire whose run exists
        except OSError as e:
            if not self.unsaved:
                log.error(
                    "%s: cannot write (%s); schedules go on from memory and the file is "
                    "written again with the next fire",
                    self.path,
                    e,
                )
            self.unsaved = True
            return
        if self.unsaved:
            log.info("%s: written again", self.path)
            self.unsaved = False

    def set(self, name: str, schedule: Schedule, accepted_at: datetime) -> None:
        """Add or replace a schedule. With the same trigger as before (a restart, or a file
        dropped again unchanged) it keeps its anchor, last fire and held fire; otherwise
        they restart at `accepted_at` (an `every` grid starts there), and a held fire of the
        old trigger is dropped."""
        _check_aware(accepted_at)
        trigger = Trigger(schedule)
        old = self._entries.get(name)
        if old is not None and old.text == trigger.text:
            self._entries[name] = _Entry(trigger, trigger.text, old.anchor, old.last_fire, old.held)
            return
        self._let_go(name, old)
        self._entries[name] = _Entry(trigger, trigger.text, accepted_at.astimezone(UTC), None)
        self.save()

    def remove(self, name: str) -> bool:
        old = self._entries.pop(name, None)
        if old is None:
            return False
        self._let_go(name, old)
        self.save()
        return True

    def retain(self, names: Collection[str]) -> list[str]:
        """Forget every schedule not in `names` (its file vanished while the daemon was
        down), so one dropped again later starts afresh. Returns the forgotten names."""
        gone = sorted(n for n in self._entries if n not in names)
        for n in gone:
            self._let_go(n, self._entries.pop(n))
        if gone:
            self.save()
        return gone

    def names(self) -> list[str]:
        return sorted(n for n, e in self._entries.items() if e.trigger is not None)

    def _active(self) -> list[tuple[str, _Entry, Trigger]]:
        return [
            (n, e, e.trigger) for n, e in sorted(self._entries.items()) if e.trigger is not None
        ]

    def due(self, now: datetime) -> Due:
        """What to fire now. Pure: records nothing; the same `now` gives the same answer.

        Per schedule, the fire times after its last fire (or its anchor) and <= now.
        Their newest runs when it is at most `grace` late; older ones never get a run of
        their own (misfires). When even the newest is later than `grace`, all are misfires:
        `run_once` makes one fire standing for them all, `skip` lists the newest in
        `skipped`, to be recorded without a run.
        """
        _check_aware(now)
        fires: list[Fire] = []
        skipped: list[tuple[str, datetime]] = []
        misfired: dict[str, int] = {}
        for name, e, trigger in self._active():
            s = trigger.schedule
            found = trigger.due_count(now, e.anchor, e.last_fire)
            if found is None:
                continue
            count, newest = found
            older = min(count - 1, MISSED_CAP)
            if (now - newest).total_seconds() <= s.grace:
                misfired[name] = older
                missed = older if s.misfire == "run_once" else 0
            else:
                misfired[name] = count
                if s.misfire == "skip":
                    skipped.append((name, newest))
                    continue
                missed = older
            fires.append(e.fire(name, newest, missed))
        fires.sort(key=lambda f: (f.fire_time, f.name))
        return Due(tuple(fires), tuple(skipped), misfired)

    def record(self, name: str, fire_time: datetime) -> None:
        """The fire at `fire_time` is handled (its run exists, or it was skipped)."""
        _check_aware(fire_time)
        e = self._entries.get(name)
        if e is None:
            log.debug("schedule %s removed before its fire %s was recorded", name, fire_time)
            return
        if e.mark(fire_time):
            self.save()

    def hold(self, fire: Fire) -> None:
        """Record `fire` and keep it until its run is queued (`release`), in one write: a
        restart in between neither loses nor repeats it. Every fire is held so, a fire that
        `overlap: queue` keeps waiting for the schedule's running run too."""
        e = self._entries.get(fire.name)
        if e is None:
            return
        e.mark(fire.fire_time)
        e.held = (fire.fire_time.astimezone(UTC), fire.missed)
        self.save()

    def _let_go(self, name: str, entry: _Entry | None) -> None:
        if entry is not None and entry.held is not None:
            self._dropped.append((name, entry.held[0]))

    def take_dropped(self) -> list[tuple[str, datetime]]:
        """(name, fire time) of the held fires let go since the last call: their schedule was
        removed, or its trigger changed, before their runs were queued."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def held(self, name: str) -> Fire | None:
        """The fire `hold` keeps for `name`, until `release`."""
        e = self._entries.get(name)
        if e is None or e.held is None or e.trigger is None:
            return None
        return e.fire(name, *e.held)

    def release(self, name: str) -> None:
        """The held fire's run exists: nothing is held any more."""
        e = self._entries.get(name)
        if e is not None and e.held is not None:
            e.held = None
            self.save()

    def spent(self) -> list[str]:
        """One-shot (`at`) schedules that are done: their fire is recorded (it ran, or
        `misfire: skip` dropped it) and nothing is held. They never fire again."""
        return [
            n
            for n, e, trigger in self._active()
            if trigger.kind == "at" and e.last_fire is not None and e.held is None
        ]

    def next_fire(self, name: str, now: datetime) -> datetime | None:
        """The next fire time after `now` (and after the last fire), in the schedule's zone."""
        _check_aware(now)
        e = self._entries.get(name)
        if e is None or e.trigger is None:
            raise KeyError(name)
        after = max(now, e.anchor if e.last_fire is None else max(e.anchor, e.last_fire))
        return e.trigger.next_after(after, e.anchor, e.last_fire)

    def next_wakeup(self, now: datetime) -> datetime | None:
        times = [t for n in self.names() if (t := self.next_fire(n, now)) is not None]
        return min(times, default=None)

    def listing(self, now: datetime) -> list[tuple[str, str, str | None]]:
        """(name, trigger text, next fire in RFC 3339 with the schedule's zone offset)."""
        rows: list[tuple[str, str, str | None]] = []
        for name, e, _trigger in self._active():
            nxt = self.next_fire(name, now)
            rows.append((name, e.text, None if nxt is None else rfc3339_local(nxt)))
        return rows
