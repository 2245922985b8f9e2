"""The queue file of an accepted run: queue/<run_id>.yaml, from acceptance until the run's
final run.json is durable.

Owns: queue/, one file per run the daemon accepted and has not seen end, holding the run's
spec bytes (a hard link of runs/<id>/spec.yaml where both are on one filesystem, else a
copy): making it, asking whether a run has one, listing them, removing one, setting one
aside. Not here: the run folder (chute.store.rundir), a run's state and what recovery does
with it (chute.engine.recovery), when the daemon lists queue/ (chute.daemon.recovery).
Crash safety: the queue file is how a starting daemon knows a run is not over. It is made
only once the run's folder, with run.json `queued`, is durable, and is durable itself before
the run is handed to the engine; it is removed only once the run's final run.json is
durable. So whatever crashes when:
- run.json `queued`, no queue file: the run was made and never handed over. What made it
  finds it again by its id (intake's claim, a fire's id, a retry request's id) and makes
  the queue file; a second run is never made.
- queue file, run.json not final: recovery resumes the run (or ends it, on_restart: fail).
- queue file, run.json final: the run ended just before the crash: recovery removes the file.
- no queue file, run.json final: over.
Retention never removes a run folder that has a queue file. A queue file whose run cannot
be recovered, nor its run.json written, is set aside as queue/<id>.yaml.unrecoverable, so no
restart loops on it. A foreground run (`chute run`, a retry without a daemon) has no queue
file: no daemon resumes it (chute.execution.owners ends what its process left).
Diagnostics: none of its own: an OSError names the path.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from chute.store import atomic
from chute.store.spool import Spool

SUFFIX = ".yaml"
ASIDE_SUFFIX = ".unrecoverable"


def name(run_id: str) -> str:
    """The queue file of `run_id` as messages show it: queue/<run_id>.yaml."""
    return f"queue/{run_id}{SUFFIX}"


def path(spool: Spool, run_id: str) -> Path:
    """The queue file of `run_id`."""
    return spool.queue / f"{run_id}{SUFFIX}"


def make(spool: Spool, run_id: str, spec_bytes: bytes) -> None:
    """Write the queue file of `run_id`, durably (its run folder must be durable already)."""
    atomic.write_bytes(path(spool, run_id), spec_bytes)


def link_many(spool: Spool, runs: Iterable[tuple[str, bytes]]) -> None:
    """Make the queue files of `runs` ((run id, spec bytes) each, run folders in place) as
    hard links of their spec.yaml: the same bytes, no second file to write and sync. Not
    durable until queue/ is synced (the caller's group commit); one made before a crash is
    kept. A runs_dir on another filesystem gets a copy instead (written durably)."""
    for run_id, spec_bytes in runs:
        target = path(spool, run_id)
        try:
            os.link(spool.runs / run_id / "spec.yaml", target)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            atomic.write_bytes(target, spec_bytes)


def exists(spool: Spool, run_id: str) -> bool:
    """Whether `run_id` has its queue file: accepted and not seen to end."""
    return path(spool, run_id).exists()


def run_ids(spool: Spool) -> list[str]:
    """The runs with a queue file, oldest first (run ids sort by creation)."""
    return sorted(p.name.removesuffix(SUFFIX) for p in spool.queue.glob(f"*{SUFFIX}"))


def remove(spool: Spool, run_id: str) -> None:
    """Remove the queue file of `run_id`, if any: only once its final run.json is durable
    (or to make it again, from bytes the caller trusts)."""
    try:
        os.unlink(path(spool, run_id))
    except FileNotFoundError:
        pass


def set_aside(spool: Spool, run_id: str) -> str:
    """Rename the queue file of a run recovery can neither resume nor end to
    queue/<id>.yaml.unrecoverable, where no start looks; returns that name."""
    queued = path(spool, run_id)
    os.rename(queued, queued.with_name(queued.name + ASIDE_SUFFIX))
    return name(run_id) + ASIDE_SUFFIX
