"""The validated form of a Job or Pipeline file: frozen values the engine runs from.

Owns: the shape of a spec after validation (defaults applied, durations in seconds,
sizes in bytes, stages in topological order). Not here: parsing and errors (chute.spec.load,
chute.spec.fields).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Kind = Literal["Job", "Pipeline"]
Backoff = Literal["fixed", "exponential"]
Misfire = Literal["run_once", "skip"]
Overlap = Literal["skip", "queue", "allow"]

API_VERSION = "chute/v1"


@dataclass(frozen=True, slots=True)
class Retries:
    max: int = 0
    backoff: Backoff = "fixed"
    delay: float = 1.0
    max_delay: float | None = None
    on_exit_codes: tuple[int, ...] = ()  # empty: every failure is retried


@dataclass(frozen=True, slots=True)
class Shards:
    count: int
    items: tuple[Any, ...] | None = None  # set with `shards: {over: [...]}`


@dataclass(frozen=True, slots=True)
class Fallback:
    run: str | tuple[str, ...] | None = None
    call: str | None = None
    with_: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    run: str | tuple[str, ...] | None = None  # str: /bin/sh -c; tuple: argv
    call: str | None = None  # "package.module:function"
    with_: Mapping[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()  # includes the stages named by `inputs`
    inputs: Mapping[str, str] = field(default_factory=dict)  # kwarg -> "stage" or "stage.a.b"
    cpus: int = 1
    memory: int = 0  # bytes; 0: no request
    timeout: float | None = None  # seconds
    retries: Retries = field(default_factory=Retries)
    shards: Shards | None = None
    cache: bool = False
    version: str = ""
    fallback: Fallback | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # pipeline env merged with the stage's
    workdir: str | None = None
    line: int = 0  # line of the stage in its file, for messages


@dataclass(frozen=True, slots=True)
class Schedule:
    cron: str | None = None
    at: datetime | None = None
    every: float | None = None  # seconds
    timezone: str = "UTC"
    misfire: Misfire = "run_once"
    grace: float = 600.0
    overlap: Overlap = "skip"


@dataclass(frozen=True, slots=True)
class Pipeline:
    kind: Kind
    name: str
    stages: tuple[Stage, ...]  # topological order, ties in file order
    labels: Mapping[str, str] = field(default_factory=dict)
    schedule: Schedule | None = None
    priority: int = 0
    fail_fast: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None

    @property
    def tasks(self) -> int:
        """The tasks one run of it makes: each stage 1, a sharded stage its shards (a
        stage's fallback, which runs only after it failed, is not counted)."""
        return sum(1 if s.shards is None else s.shards.count for s in self.stages)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)
