"""One stage of a run and its units: their states, attempts and manifest entries.

Owns: the stage and unit states and what each is made of (a *unit* is what runs once per
attempt: a whole stage, one shard of it, or its fallback), the attempts a unit keeps, and
the manifest entry of an attempt, a unit and a stage. Not here: how a result moves a run's
stages on (chute.engine.dag).
Pure: no I/O and no clock; times are epoch seconds given in, only recorded.
Attempts: a unit keeps its first ATTEMPTS_FIRST and last ATTEMPTS_LAST attempts, in memory
and in the manifest; `attempts_total` counts them all (the attempt number and the retry
decision use it), `attempts_omitted` says how many are not listed. Each attempt records the
cores it ran on; an entry's `cores` are those of its last listed attempt (a stage's: its
fallback's once that ran; a sharded stage's own entry lists only its fallback's attempts,
so its shards carry theirs).
Cost: a unit's manifest entry is made again only when the unit changed, and a stage's not
at all once it is final.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chute.clock import rfc3339
from chute.spec.model import Stage

STAGE_OK = frozenset({"succeeded", "cached", "fallback"})
STAGE_FINAL = STAGE_OK | {"failed", "timed_out", "cancelled", "skipped"}
UNIT_FINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled", "skipped", "cached"})
ATTEMPTS_FIRST = 3  # attempts of a unit kept from its first ...
ATTEMPTS_LAST = 3  # ... and from its last: at most 6 listed, however many it made


def _time(wall: float | None) -> str | None:
    return None if wall is None else rfc3339(wall)


def _duration(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 6)


@dataclass(slots=True)
class Attempt:
    attempt: int
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    fallback: bool = False
    cores: tuple[int, ...] = ()

    def entry(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "attempt": self.attempt,
            "started_at": _time(self.started_at),
            "finished_at": _time(self.finished_at),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "cores": list(self.cores),
        }
        if self.fallback:
            rec["fallback"] = True
        return rec


@dataclass(slots=True, eq=False)
class Unit:
    run_id: str
    stage: str
    shard: int | None = None
    fallback: bool = False
    state: str = "pending"
    attempts: list[Attempt] = field(default_factory=list)  # the first and last few
    attempts_total: int = 0  # attempts made (charged), listed or not
    not_before: float = 0.0
    cores: tuple[int, ...] = ()
    data: Any = None
    output_hash: str | None = None
    input_hash: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    _entry: dict[str, Any] | None = None  # its manifest entry, as of `_entry_of`
    _entry_of: tuple[Any, ...] = ()

    @property
    def key(self) -> str:
        """The executor's name for this unit's task (one attempt runs at a time)."""
        where = self.stage if self.shard is None else f"{self.stage}/{self.shard}"
        if self.fallback:
            where += "/fallback"
        return f"{self.run_id}/{where}"

    @property
    def attempts_omitted(self) -> int:
        return self.attempts_total - len(self.attempts)

    def add_attempt(self, wall: float, cores: tuple[int, ...] = ()) -> Attempt:
        """Charge and record the next attempt, started at `wall` on `cores`; forget the
        oldest of the last ones past ATTEMPTS_FIRST + ATTEMPTS_LAST."""
        self.attempts_total += 1
        attempt = Attempt(self.attempts_total, wall, fallback=self.fallback, cores=cores)
        self.attempts.append(attempt)
        if len(self.attempts) > ATTEMPTS_FIRST + ATTEMPTS_LAST:
            del self.attempts[ATTEMPTS_FIRST]
        return attempt

    def drop_attempt(self) -> None:
        """Take back the current attempt: it was lost through no fault of its own."""
        self.attempts.pop()
        self.attempts_total -= 1

    def entry(self) -> dict[str, Any]:
        """Manifest fields of one shard; made again only when the shard changed (every
        change of an attempt comes with one of the unit's state, cores or times)."""
        as_of = (self.state, self.attempts_total, self.cores, self.started_at, self.finished_at)
        if self._entry is None or as_of != self._entry_of:
            self._entry_of = as_of
            self._entry = {
                "index": self.shard,
                "state": self.state,
                "cores": list(self.attempts[-1].cores) if self.attempts else [],
                "started_at": _time(self.started_at),
                "finished_at": _time(self.finished_at),
                "duration_seconds": _duration(self.started_at, self.finished_at),
                "attempts": [a.entry() for a in self.attempts],
                "attempts_total": self.attempts_total,
                "attempts_omitted": self.attempts_omitted,
                "output": f"stages/{self.stage}/{self.shard}/output.json"
                if self.state == "succeeded"
                else None,
                "log": f"stages/{self.stage}/{self.shard}/log",
            }
        return self._entry


@dataclass(frozen=True, slots=True)
class Reused:
    """A stage finished in an earlier run (or before a crash) whose result this run keeps."""

    entry: Mapping[str, Any]  # its manifest entry, recorded as it was
    data: Any
    output_hash: str | None


@dataclass(slots=True, eq=False)
class StageRun:
    spec: Stage
    units: list[Unit]
    state: str = "pending"
    waiting_on: int = 0
    dependents: list[str] = field(default_factory=list)
    fallback_unit: Unit | None = None
    cache: dict[str, Any] | None = None
    data: Any = None
    output_hash: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    reused: Reused | None = None
    open_units: int = 0  # units (the fallback too) not in UNIT_FINAL
    _final_entry: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.open_units = len(self.units)

    @property
    def name(self) -> str:
        return self.spec.name

    def end(self, unit: Unit, state: str) -> None:
        """Put `unit` of this stage in `state`, counting it off when it becomes final."""
        if state in UNIT_FINAL and unit.state not in UNIT_FINAL:
            self.open_units -= 1
        unit.state = state

    def all_units(self) -> list[Unit]:
        return self.units if self.fallback_unit is None else [*self.units, self.fallback_unit]

    def entry(self) -> dict[str, Any]:
        """This stage's entry in manifest.json (made once when the stage is final)."""
        if self._final_entry is not None:
            return self._final_entry
        made = self._entry()
        if self.state in STAGE_FINAL:
            self._final_entry = made
        return made

    def _entry(self) -> dict[str, Any]:
        if self.reused is not None:
            return dict(self.reused.entry)
        s = self.spec
        sharded = s.shards is not None
        counted = (
            self.all_units()
            if not sharded
            else []
            if self.fallback_unit is None
            else [self.fallback_unit]
        )
        attempts = [a.entry() for u in counted for a in u.attempts]
        has_output = self.state in STAGE_OK
        return {
            "name": s.name,
            "state": self.state,
            "dependsOn": list(s.depends_on),
            "cpus": s.cpus,
            "cores": attempts[-1]["cores"] if attempts else [],
            "started_at": _time(self.started_at),
            "finished_at": _time(self.finished_at),
            "duration_seconds": _duration(self.started_at, self.finished_at),
            "attempts": attempts,
            "attempts_total": sum(u.attempts_total for u in counted),
            "attempts_omitted": sum(u.attempts_omitted for u in counted),
            "cache": self.cache,
            "output": f"stages/{s.name}/output.json" if has_output else None,
            "log": None if sharded and self.fallback_unit is None else f"stages/{s.name}/log",
            "shards": [u.entry() for u in self.units] if sharded else [],
        }
