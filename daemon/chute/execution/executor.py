"""The seam between the engine and whatever starts processes: tasks in, results out.

Owns: the task and result values and the Executor protocol. The engine starts and stops
tasks only through an Executor, so states, retries, cache and manifests are one code path
for every backend. Not here: the local backend (chute.execution.local), the engine (chute.engine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

MAX_OUTPUT_BYTES = 1 << 20

OUTPUT_TOO_BIG = (
    "output is {size} bytes, over the 1 MiB limit; write the data to a file under "
    "$CHUTE_ARTIFACTS (ctx.artifacts) and return its path instead"
)


@dataclass(frozen=True, slots=True)
class Context:
    """What a `call:` stage gets as `ctx=` when its function has a parameter named ctx."""

    run_id: str
    stage: str
    artifacts: str
    shard_index: int | None
    shard_count: int | None
    shard_item: Any
    cores: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    """A call: task's done-mark, which its worker writes when the call succeeds: the
    stage's output.json (chute.store.outputs.document), put in place but not synced (the engine
    syncs it, as the ones it writes). The Result then carries it in `done`."""

    path: str  # the stage's (or shard's) output.json
    run_dir: str  # no artifact may link outside it
    stage: str
    version: str
    input_hash: str | None
    started_at: float  # epoch seconds, the attempt's start (for duration_seconds)


@dataclass(frozen=True, slots=True)
class Task:
    """One attempt of one stage (or shard) on given cores."""

    key: str  # unique within the executor: "<run_id>/<stage>[/<shard>]#<attempt>"
    kind: Literal["run", "call"]
    cores: tuple[int, ...]
    log_path: str  # stdout and stderr (and logging, for call:) are appended here
    output_path: str  # run: CHUTE_OUTPUT, where the command may write its JSON output
    env: Mapping[str, str]  # run: the complete environment; call: set around the call
    cwd: str | None = None
    timeout: float | None = None  # seconds on the monotonic clock, from start
    folders: tuple[str, ...] = ()  # to make (parents first) before the task starts, if missing
    command: str | tuple[str, ...] | None = None  # run: str -> /bin/sh -c, tuple -> argv
    call: str | None = None  # call: "module:function"
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # call: with + inputs
    context: Context | None = None  # call: passed as ctx= if the function takes it
    mark: Mark | None = None  # call: write the done-mark on success (see Mark)


@dataclass(frozen=True, slots=True)
class Result:
    key: str
    exit_code: int | None = None  # run: the process's code; call: 0 ok, 1 raised
    signal: int | None = None  # the signal that ended the process, if any
    error: str | None = None  # one line for the manifest, None on success
    output: bytes | None = None  # JSON text of the task's output, None when it gave none
    timed_out: bool = False
    cancelled: bool = False
    lost: bool = False  # ended by no fault of its own (a pool broke): rerun without charge
    # The task did not start: its folders or log could not be made for want of a writable
    # spool (no room, read-only, EIO: atomic.environment_wide; with lost=True). The engine
    # starts nothing until the spool can be written again.
    no_room: int | None = None  # the errno
    done: bytes | None = None  # the done-mark the executor put in place (Task.mark)
    output_hash: str | None = None  # with `done`: the hash of the output's data

    @classmethod
    def not_started(cls, key: str) -> Result:
        """A task cancelled before it ever ran (queued for a worker, or for a spawn)."""
        return cls(key=key, error="cancelled before it started", cancelled=True)

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0


class Executor(Protocol):
    def start(self, task: Task) -> None:
        """Start `task` now; its Result goes to the `on_result` the backend was made with,
        later, on the loop's thread (from a callback of the reactor, or from `tick`)."""

    def cancel(self, key: str) -> None:
        """End a started task: SIGTERM, grace, SIGKILL; its Result has cancelled=True."""

    def tick(self, mono: float) -> float | None:
        """Do what is due at `mono` (monotonic: deadlines, kill escalations) and hand over the
        Results that are ready; returns the seconds until the next call is due (None: only
        an event of one of its descriptors can change anything). The loop calls it after
        each wait."""

    def close(self) -> None:
        """End every task and worker; no process of ours is left afterwards."""
