"""A unit to a Task: the folders, environment, inputs and log header of one attempt.

Owns: what a task is given (docs/tasks.md): its folder and artifacts/, the clean
environment with the CHUTE_ variables, CHUTE_INPUTS (its upstream outputs and `inputs:`),
the line its log gets before a second attempt or a fallback, and for a call: stage the
done-mark its worker writes (Task.mark). Not here: which unit starts on which cores
(chute.engine.loop, chute.scheduling.allocator), running it (chute.execution), what its
result means (chute.engine.results).
Crash safety: nothing here is a state change. CHUTE_INPUTS is derived data, rebuilt on every
attempt. A first attempt that needs no file in its folder beforehand has its folders made
by the executor (Task.folders: fewer file creates on the loop), synced with its output.
Diagnostics: what the attempt cannot be given (an input its upstream did not output, a log
or CHUTE_INPUTS path a task replaced) is the attempt's error, `problem`; for want of a
writable spool, OSError (the unit waits, uncharged).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from chute.clock import rfc3339
from chute.engine.runs import ActiveRun
from chute.engine.stage import Unit
from chute.execution import runner
from chute.execution.executor import Context, Mark, Task
from chute.scheduling import allocator
from chute.scheduling.topology import format_cpulist
from chute.store import atomic, rundir
from chute.store.outputs import digest

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EMPTY_INPUTS = b'{"inputs":{},"upstream":{}}\n'


def base_env() -> dict[str, str]:
    """The clean environment every task starts from: PATH, HOME, LANG, TZ of the daemon."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ") if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    return env


def resolve_input(ref: str, upstream: dict[str, Any]) -> Any:
    """The value `stage.a.b` names in the upstream outputs; KeyError says what is there."""
    stage, _, path = ref.partition(".")
    value = upstream.get(stage)
    walked = stage
    for part in path.split(".") if path else []:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            if isinstance(value, dict):
                have = f"fields: {', '.join(map(str, value)) or 'none'}"
            elif isinstance(value, list):
                have = f"a list of {len(value)}"
            else:
                have = f"its value is {orjson.dumps(value).decode()[:60]}"
            raise KeyError(f"{walked} has no {part!r} ({have})")
        walked += f".{part}"
    return value


@dataclass(frozen=True, slots=True)
class Prepared:
    """One attempt of a unit, ready for the executor."""

    task: Task
    made: tuple[Path, ...]  # folders the executor makes for it (Task.folders), parents first
    problem: str | None  # why the attempt fails before it starts (then it is not started)


def prepare(
    run: ActiveRun,
    unit: Unit,
    grant: allocator.Grant,
    wall: float,
    *,
    stage_folder: Callable[[ActiveRun, str, int | None], Path],
    empty_inputs: Callable[[], Path],
) -> Prepared:
    """The Task of `unit`'s next attempt on `grant`, at `wall`. `stage_folder` makes a
    unit's folder (chute.engine.writes.Writes.stage_folder); `empty_inputs` is the shared
    CHUTE_INPUTS of units without upstream. OSError: for want of a writable spool."""
    spec = run.graph.stages[unit.stage].spec
    attempt_no = unit.attempts_total + 1
    problem: str | None = None
    folder = rundir.stage_dir(run.dir, spec.name, unit.shard)
    made: tuple[Path, ...] = ()
    if attempt_no == 1 and not unit.fallback and not spec.depends_on:
        made = rundir.stage_dirs(run.dir, spec.name, unit.shard)
    else:
        try:
            stage_folder(run, spec.name, unit.shard)
        except OSError as exc:  # the unit's own folders: a task replaced one (a FIFO)
            if atomic.environment_wide(exc):
                raise
            problem = f"cannot make folder {exc.filename}: {exc.strerror}"
    fb = spec.fallback if unit.fallback else None
    run_cmd = fb.run if fb is not None else spec.run
    call = fb.call if fb is not None else spec.call
    kwargs: dict[str, Any] = dict(fb.with_ if fb is not None else spec.with_)

    upstream = run.graph.upstream_data(spec)
    inputs: dict[str, Any] = {}
    for kwarg, ref in spec.inputs.items():
        try:
            inputs[kwarg] = resolve_input(ref, upstream)
        except KeyError as exc:
            problem = problem or f"inputs.{kwarg}: {exc.args[0]}"
    inputs_blob = (
        orjson.dumps({"inputs": inputs, "upstream": upstream}) if spec.depends_on else None
    )
    unit.input_hash = digest(inputs_blob or EMPTY_INPUTS)
    if inputs_blob is None:
        inputs_path = empty_inputs()
    else:
        inputs_path = folder / ".inputs.json"
        try:  # derived data, rebuilt on every attempt; replaces whatever a task put there
            atomic.write_volatile(inputs_path, inputs_blob)
        except OSError as exc:
            if atomic.environment_wide(exc):
                raise
            problem = problem or f"cannot write CHUTE_INPUTS {inputs_path}: {exc.strerror}"

    count = spec.shards.count if spec.shards is not None else 1
    index = unit.shard if unit.shard is not None else 0
    item: Any = None
    if spec.shards is not None and spec.shards.items is not None and unit.shard is not None:
        item = spec.shards.items[unit.shard]
    chute_env = {
        "CHUTE_RUN_ID": run.run_id,
        "CHUTE_RUN_DIR": str(run.dir),
        "CHUTE_RUN_DATE": str(run.record.get("run_date", "")),
        "CHUTE_STAGE": spec.name,
        "CHUTE_ARTIFACTS": str(folder / "artifacts"),
        "CHUTE_INPUTS": str(inputs_path),
        "CHUTE_OUTPUT": str(folder / ".output.json"),
        "CHUTE_SHARD_INDEX": str(index),
        "CHUTE_SHARD_COUNT": str(count),
        "CHUTE_CPUS": str(len(grant.cores)),
        "CHUTE_CPU_LIST": format_cpulist(grant.cores),
    }
    if item is not None:
        chute_env["CHUTE_SHARD_ITEM"] = (
            item if isinstance(item, str) else orjson.dumps(item).decode()
        )
    env = (
        {**base_env(), **spec.env, **chute_env}
        if run_cmd is not None
        else {
            **spec.env,
            **chute_env,
        }
    )
    log_path = folder / "log"  # a fallback's folder is its stage's
    if (attempt_no > 1 or unit.fallback) and problem is None:
        what = "fallback" if unit.fallback else f"attempt {attempt_no}"
        problem = log_header(log_path, f"--- chute: {what} at {rfc3339(wall)} ---\n")
    mark = None
    if call is not None and not unit.fallback:
        # The worker writes the done-mark itself when the call succeeds: one file
        # fewer for the loop to create per stage; it is synced like the loop's own.
        mark = Mark(
            path=str(folder / "output.json"),
            run_dir=str(run.dir),
            stage=spec.name,
            version=spec.version,
            input_hash=unit.input_hash,
            started_at=wall,
        )
    task = Task(
        key=unit.key,
        kind="run" if run_cmd is not None else "call",
        cores=grant.cores,
        log_path=str(log_path),
        output_path=chute_env["CHUTE_OUTPUT"],
        env=env,
        cwd=spec.workdir or str(folder),
        timeout=spec.timeout,
        folders=tuple(map(str, made)),
        mark=mark,
        command=run_cmd,
        call=call,
        kwargs={**kwargs, **inputs},
        context=Context(
            run_id=run.run_id,
            stage=spec.name,
            artifacts=chute_env["CHUTE_ARTIFACTS"],
            shard_index=index,
            shard_count=count,
            shard_item=item,
            cores=grant.cores,
        ),
    )
    return Prepared(task, made, problem)


def log_header(path: Path, text: str) -> str | None:
    """Append `text` to a stage's log; the attempt's error when the log cannot take it (a
    task put a FIFO, a folder or a link in its place). OSError: for want of a writable
    spool (the attempt waits, uncharged)."""
    try:
        fd = runner.open_log(str(path))
    except runner.SpawnError as exc:
        if exc.no_room is not None:
            raise OSError(exc.no_room, os.strerror(exc.no_room), str(path)) from None
        return str(exc)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return None


def empty_inputs_file(state: Path) -> Path:
    """state/empty-inputs.json: the CHUTE_INPUTS of every unit without upstream, written
    once."""
    path = state / "empty-inputs.json"
    if not path.exists():
        atomic.write_bytes(path, EMPTY_INPUTS)
    return path
