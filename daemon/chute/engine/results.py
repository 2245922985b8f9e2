"""A Result to files: a unit's done-mark, a stage's output.json and cache entry, the log line.

Owns: what an ended task leaves in its run folder that the engine writes or checks: its
artifacts listing, its output's data and hash, its done-mark (stages/<stage>[/<shard>]/
output.json), a sharded stage's gathered output.json, a cache hit placed in a stage folder
and a cache entry kept from one (chute.engine.cache), and the line each attempt logs. Not
here: the states a result moves the run to (chute.engine.dag), the group commit these
files go out in (chute.engine.writes), failing a run (chute.engine.loop).
Crash safety: a stage's output.json is its idempotent "done" mark: written once, after the
task ended, so a crash leaves the stage done or not run (a call: task's worker writes its
own, Task.mark, and it is synced like one of the loop's). It is in place before any
dependent starts, and durable before the next manifest that names it. A cache entry lands
in the same group commit as its stage's done-mark, its files first and its entry.json last,
before the run's final run.json.
Diagnostics: a task's own files that cannot be used (its artifacts, its output, its
done-mark's path) fail its attempt with the reason; a path of the run no attempt is left to
fail for (a sharded stage's output.json, a cache hit's) comes back as the run's failure
reason. A cache entry that cannot be used or kept is one WARNING line, never a failure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from chute.engine import cache
from chute.engine.runs import ActiveRun
from chute.engine.stage import StageRun, Unit
from chute.engine.writes import Writes
from chute.execution.executor import Result
from chute.store import atomic, rundir
from chute.store.outputs import data_hash, document, relocate, scan_artifacts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Output:
    """What an ended attempt left: `result` (turned into a failure when what it left
    cannot be used), its data and output_hash, and its done-mark's bytes when it has one."""

    result: Result
    data: Any
    output_hash: str | None
    mark: bytes | None
    folder: Path  # the unit's folder (a fallback's is its stage's)


def collect(run: ActiveRun, unit: Unit, result: Result, wall: float, writes: Writes) -> Output:
    """Check what `result`'s task left and put its done-mark in place (a worker's is in
    place already); a call that did not succeed loses the mark its worker may have left."""
    data: Any = None
    output_hash: str | None = None
    listing: list[dict[str, str]] = []
    blob: bytes | None = result.done
    stage = run.graph.stages[unit.stage]
    folder = rundir.stage_dir(run.dir, unit.stage, None if unit.fallback else unit.shard)
    if result.ok and result.done is None:
        listing, problem = scan_artifacts(folder / "artifacts", folder, run.dir)
        if problem is not None:
            result = Result(key=result.key, exit_code=result.exit_code, error=problem)
    if result.ok:
        try:
            data = orjson.loads(result.output) if result.output else None
        except orjson.JSONDecodeError as exc:
            result = Result(
                key=result.key, exit_code=result.exit_code, error=f"output is not JSON: {exc}"
            )
        else:
            output_hash = result.output_hash or data_hash(data)
    if result.ok and result.done is None:
        # Handover: this output.json is the unit's done-mark. Written before the attempt is
        # recorded: a task that left something in its place (a folder) fails its own attempt.
        blob = document(
            stage=stage.spec.name,
            version=stage.spec.version,
            created_at=wall,
            started_at=unit.started_at,
            input_hash=unit.input_hash,
            data=data,
            artifacts=listing,
            output_hash=output_hash,
        )
        error = writes.mark(folder / "output.json", blob)
        if error is not None:
            error = f"cannot write the done-mark {folder / 'output.json'}: {error}"
            result = Result(key=result.key, exit_code=result.exit_code, error=error)
    elif not result.ok and stage.spec.call is not None and not unit.fallback:
        # A call stopped after its worker left the done-mark (Task.mark): not done.
        try:
            os.unlink(folder / "output.json")
        except OSError as exc:  # none, or a task's folder: the stage is not done either way
            log.debug("%s: %s", folder / "output.json", exc.strerror)
    return Output(result, data, output_hash, blob, folder)


def log_attempt(run: ActiveRun, unit: Unit, result: Result) -> None:
    """The line an ended attempt logs (`retrying` when another attempt follows)."""
    a = unit.attempts[-1] if unit.attempts else None
    if a is None:
        return
    name = unit.stage if unit.shard is None else f"{unit.stage}[{unit.shard}]"
    if unit.fallback:
        name += " fallback"
    level = logging.INFO if result.ok or unit.state == "pending" else logging.WARNING
    log.log(
        level,
        "%s stage %s finished state=%s exit_code=%s attempt=%d/%d duration=%.3fs%s",
        run.run_id,
        name,
        "retrying" if unit.state == "pending" else unit.state,
        a.exit_code,
        a.attempt,
        run.graph.stages[unit.stage].spec.retries.max + 1,
        (a.finished_at or 0.0) - a.started_at,
        f" error={a.error!r}" if a.error else "",
    )


def stage_output(
    run: ActiveRun, stage: StageRun, wall: float, mark: bytes | None, writes: Writes
) -> str | None:
    """A stage that just succeeded: a sharded one's output.json gathers its shards'; a
    cacheable one's output is kept in cache/ (`mark`: its output.json). The run's failure
    reason when a path of it cannot take what is written, else None."""
    spec = stage.spec
    if stage.state != "succeeded":
        return None
    if spec.shards is not None:
        try:
            folder = writes.stage_folder(run, spec.name, None)
        except OSError as exc:
            if not atomic.environment_wide(exc):
                return f"cannot write {exc.filename}: {exc.strerror}"
            folder = rundir.stage_dir(run.dir, spec.name)  # the mark waits for room
        mark = document(
            stage=spec.name,
            version=spec.version,
            created_at=wall,
            started_at=None,
            input_hash=None,
            data=stage.data,
            artifacts=_shard_artifacts(run.run_id, folder, run.dir),
        )
        stage.output_hash = data_hash(stage.data)
        path = folder / "output.json"
        error = writes.mark(path, mark)
        if error is not None:
            return f"cannot write {path}: {error}"
    if spec.cache and stage.cache is not None and mark is not None:
        _keep_in_cache(run, stage, mark, writes)
    return None


def _keep_in_cache(run: ActiveRun, stage: StageRun, mark: bytes, writes: Writes) -> None:
    assert stage.cache is not None
    key = stage.cache["key"]
    cache_dir = writes.spool.cache
    try:  # the entry owns the stage's files: no later run needs this run's folder
        folder = rundir.stage_dir(run.dir, stage.name)
        kept = cache.keep(cache_dir, key, mark, folder, run.dir)
    except OSError as exc:  # a task can reach cache/; a cache entry is a nicety
        log.warning(
            "cache entry %s not kept: %s%s",
            cache_dir / key,
            f"{exc.filename}: " if exc.filename else "",
            exc.strerror,
        )
        return
    cache.touch(cache_dir, key)  # kept while the write waits
    # Handover: its files' contents and names are synced in the group commit before
    # entry.json, the entry's commit point, which lands before the run's final run.json: a
    # run dropped once this one has ended finds the entry.
    writes.put_synced(kept.links)
    writes.put_folders(kept.folders)
    writes.put(*kept.write)


def cache_hit(
    run: ActiveRun, stage: StageRun, wall: float, writes: Writes
) -> tuple[bool, str | None]:
    """Look `stage` up in the cache: a hit puts the entry's files in the stage's folder and
    its output, paths moved to this run (outputs.relocate), as the stage's done-mark (the
    run then needs no other run's folder), and ends the stage `cached`. An entry that
    cannot be used is a miss: the stage runs. Returns (hit, the run's failure reason)."""
    upstream = {d: run.graph.stages[d].output_hash or "" for d in stage.spec.depends_on}
    key = cache.cache_key(stage.spec, upstream)
    cache_dir = writes.spool.cache
    stage.cache = {"key": key, "hit": False}
    cache.touch(cache_dir, key)  # before the read: retention leaves it alone now
    try:
        entry = cache.lookup(cache_dir, key)
    except cache.Unusable as why:
        log.warning("%s cache entry %s %s; running the stage", run.run_id, key, why)
        return False, None
    if entry is None:
        return False, None
    try:
        folder = writes.stage_folder(run, stage.name, None)
        writes.put_folders(cache.place(entry, folder))
    except OSError as exc:
        if atomic.environment_wide(exc):  # the stage runs instead, once there is room
            writes.trouble(exc, f"making the folder of {stage.name}")
            return False, None
        if exc.filename is not None and str(exc.filename).startswith(str(entry.folder)):
            log.warning(
                "%s cache entry %s cannot be used (%s: %s); running the stage",
                run.run_id,
                key,
                exc.filename,
                exc.strerror,
            )
            return False, None
        return False, f"cannot write {exc.filename}: {exc.strerror}"
    data = relocate(entry.doc["data"], entry.origins, str(run.dir))
    path = folder / "output.json"
    error = writes.mark(path, atomic.dumps({**entry.doc, "data": data}))
    if error is not None:
        return False, f"cannot write {path}: {error}"
    # The hit keeps the entry's output_hash (what its dependents' cache keys are made of),
    # though its paths now name this run's files.
    run.graph.cache_hit(stage.name, data, entry.output_hash, wall)
    log.info("%s stage %s finished state=cached key=%s", run.run_id, stage.name, key[:12])
    return True, None


def _shard_artifacts(run_id: str, stage_folder: Path, run_dir: Path) -> list[dict[str, str]]:
    """A sharded stage's artifacts: every shard's, in shard order (each checked when its
    shard ended). A shard's that can no longer be listed (another task of the run replaced
    its folder, or put a FIFO in it since) is left out, with a warning: no attempt is left
    to fail for it."""
    try:
        with os.scandir(stage_folder) as entries:
            shards = sorted(
                (e.name for e in entries if e.name.isdigit() and e.is_dir(follow_symlinks=False)),
                key=int,
            )
    except OSError as exc:
        log.warning("%s: cannot list the shards of %s: %s", run_id, stage_folder, exc.strerror)
        return []
    out: list[dict[str, str]] = []
    for shard in shards:
        listing, problem = scan_artifacts(stage_folder / shard / "artifacts", stage_folder, run_dir)
        if problem is not None:
            log.warning(
                "%s stage %s shard %s: %s; its artifacts are left out of the stage's output.json",
                run_id,
                stage_folder.name,
                shard,
                problem,
            )
            continue
        out.extend(listing)
    return out
