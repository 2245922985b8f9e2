"""The engine's writes: what each group commit carries, when a run's manifest is due, a
run's end, and what the writer thread could not write.

Owns: the files, done-marks and folder names of one loop step, handed to the writer thread
as one group commit (chute.store.writer.Committer); stage folders made by the loop; when
each run's manifest is written; a run's final manifest and run.json; whether the spool can
be written now (a full disk pauses every start, probed once a second); what the writer
thread hands back unwritten. Not here: what a file says (chute.engine.results, the run's
graph), deciding that a run fails (chute.engine.loop).
Crash safety: all writes of one loop step go out in one group commit, in order: a unit's
output.json before the manifest that points at it, and a run's final manifest before its
final run.json. The manifest of a running run is rewritten at most every MANIFEST_INTERVAL
seconds (longer for a manifest that takes long to make: MANIFEST_SHARE), and at once when a
stage fails or the run ends; run.json turns `running` with the first of those (a run
shorter than that is written queued, then final). `on_finished` runs only once a run's
final run.json is durable: the caller removes its queue file then.
Diagnostics: a write that fails is scoped by its errno (atomic.environment_wide): no room,
a read-only or failing filesystem is one ERROR line and pauses every start until a probe
write succeeds; anything else is about that path, handed back (`lost`) for the loop to fail
its run. A run whose end cannot be recorded at all is dropped with one ERROR line
(_rewrite_end).
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from chute.clock import Clock, parse_rfc3339, rfc3339
from chute.engine.runs import ActiveRun
from chute.store import atomic, groupcommit, rundir, writer
from chute.store.spool import Spool

log = logging.getLogger(__name__)

MANIFEST_INTERVAL = 0.5
MANIFEST_SHARE = 0.1
"""A running run's manifest waits between rewrites at least MANIFEST_INTERVAL, and at least
its last one's making time / MANIFEST_SHARE: a big run's manifest takes at most this share
of the loop, however big it is."""
CLOSE_LIMIT = 5.0  # seconds `close` waits for writes that keep failing (a full disk)
PROBE_INTERVAL = 1.0  # seconds between probe writes while the spool cannot be written


class Writes:
    """The engine's side of the writer thread: one group commit per `flush`."""

    def __init__(
        self,
        *,
        spool: Spool,
        clock: Clock,
        syncfs: Sequence[Path],
        wake: Callable[[], None],
        on_finished: Callable[[ActiveRun], None] | None,
    ) -> None:
        """`wake`: makes the loop step soon (the writer thread hands it something);
        `on_finished(run)`: in the writer thread, once the run's final run.json is durable."""
        self.spool = spool
        self.clock = clock
        self.on_finished = on_finished
        self._wake = wake
        self._files: list[tuple[Path, bytes]] = []
        self._synced: list[Path] = []  # in place already, to fsync with the next commit
        self._folders: set[Path] = set()  # folders that gained names
        self._due: dict[ActiveRun, float] = {}  # run -> monotonic s its manifest is due
        self._runs_parts = spool.runs.parts
        # Filled by the writer thread: paths it could not write, and runs whose final
        # files were among them.
        self._unwritten: deque[groupcommit.Unwritten] = deque()
        self._unended: deque[tuple[ActiveRun, groupcommit.Unwritten]] = deque()
        self._committer = writer.Committer(
            syncfs=syncfs, scope=self.run_of, on_unwritten=self._on_unwritten
        )
        self.disk_error: OSError | None = None  # set while the spool cannot be written
        self._next_probe = 0.0

    # -- what the next commit carries ------------------------------------------------------

    def put(self, path: Path, blob: bytes) -> None:
        """Write `blob` at `path` with the next commit."""
        self._files.append((path, blob))

    def put_synced(self, paths: Iterable[Path]) -> None:
        """Files in place already (a worker's done-mark, a cache entry's links): synced
        with the next commit, before its files are renamed."""
        self._synced.extend(paths)

    def put_folders(self, folders: Iterable[Path]) -> None:
        """Folders that gained names: synced with the next commit."""
        self._folders.update(folders)

    def stage_folder(self, run: ActiveRun, stage: str, shard: int | None) -> Path:
        """The unit's folder, made (with its artifacts/) if it was not yet; its name is
        synced with the next commit."""
        folder = rundir.stage_dir(run.dir, stage, shard)
        if folder not in run.made:
            for f in rundir.stage_dirs(run.dir, stage, shard):
                try:
                    os.mkdir(f)
                    self._folders.add(f.parent)
                except FileExistsError:
                    pass
            run.made.add(folder)
        return folder

    def mark(self, path: Path, blob: bytes) -> str | None:
        """Put the done-mark `blob` in place at `path` (made durable with the next commit);
        the errno text when `path` cannot take it for a reason of its own (the run's
        problem: a folder there, its folder gone). For want of a writable spool the
        committer holds the mark and retries until it lands."""
        try:
            atomic.write_volatile(path, blob)
        except OSError as exc:
            if not atomic.environment_wide(exc):
                return exc.strerror or str(exc)
            self.trouble(exc, f"writing {path}")
            self._files.append((path, blob))
            return None
        self._synced.append(path)
        return None

    # -- manifests and a run's end ---------------------------------------------------------

    def dirty(self, run: ActiveRun, urgent: bool = False) -> None:
        """`run`'s manifest changed: written at once if `urgent`, else when its wait is over."""
        mono = self.clock.monotonic()
        wait = max(MANIFEST_INTERVAL, run.manifest_cost / MANIFEST_SHARE)
        due = mono if urgent else mono + wait
        if due < self._due.get(run, math.inf):
            self._due[run] = due

    def next_due(self) -> float | None:
        """Monotonic seconds when the next manifest is due, None if none is."""
        return min(self._due.values(), default=None)

    def forget(self) -> None:
        """Drop every due manifest (the engine stops driving its runs)."""
        self._due.clear()

    def end(
        self, run: ActiveRun, state: str, error: str | None, wall: float, *, finished: bool
    ) -> None:
        """Write `run`'s manifest, then its run.json in `state`, as of `wall`. `finished`:
        the run is over (`finished_at`, its duration; in a commit of their own, then
        `on_finished` once durable); else it is left to resume (stopped)."""
        self._due.pop(run, None)
        rec = run.record
        rec["state"], rec["error"] = state, error
        if finished:
            rec["finished_at"] = rfc3339(wall)
            started = rec.get("started_at") or rec.get("created_at")
            if started:
                rec["duration_seconds"] = round(wall - parse_rfc3339(started).timestamp(), 6)
        # Handover: the final manifest, then the run.json that says the run is over.
        self._files.append((run.dir / "manifest.json", self._manifest(run)))
        self._files.append((run.dir / "run.json", atomic.dumps(rec)))
        if finished:
            self.flush(on_done=self._finished_callback(run))

    def _manifest(self, run: ActiveRun) -> bytes:
        began = time.perf_counter()  # the loop's own time, whatever the Clock says
        blob = atomic.dumps(
            {"run_id": run.run_id, "pipeline": run.pipeline.name, "stages": run.graph.manifest()}
        )
        run.manifest_cost = time.perf_counter() - began
        return blob

    def _finished_callback(self, run: ActiveRun) -> Callable[[], None]:
        hook = self.on_finished

        def finished() -> None:  # in the writer thread, after the run's final batch
            lost = self._committer.unwritten_scopes.get(run.run_id)
            if lost is not None:  # its end is not on disk: the loop decides (_rewrite_end)
                self._unended.append((run, lost))
                self._wake()
            elif hook is not None:
                hook(run)

        return finished

    def _rewrite_end(self, run: ActiveRun, lost: groupcommit.Unwritten) -> None:
        """A finished run whose final files did not all land (`lost` says which and why):
        its run.json is written once more, alone, saying the run failed and why. If that
        cannot be (run.json itself, or the run folder, is what failed), the run is dropped:
        one ERROR line, and its queue file goes (on_finished), so no restart resumes it."""
        reason = f"cannot write {lost.cause}: {lost.error.strerror}"
        record = run.dir / "run.json"
        try:
            folder_ok = stat.S_ISDIR(os.lstat(run.dir).st_mode)
        except OSError:
            folder_ok = False
        rec = run.record
        if run.rewritten or lost.cause == record or not folder_ok:
            log.error(
                "%s dropped: %s; its end cannot be recorded in %s, and it is not resumed",
                run.run_id,
                reason,
                run.dir,
            )
            rec["state"], rec["error"] = "failed", reason  # for its summary line and metric
            if self.on_finished is not None:
                self.on_finished(run)
            return
        run.rewritten = True
        if rec["state"] != "failed":  # else it says why already (a stage, or _fail_run)
            log.warning("%s failed: %s", run.run_id, reason)
            rec["state"] = "failed"
            rec["error"] = reason
        self._committer.submit([(record, atomic.dumps(rec))], on_done=self._finished_callback(run))

    # -- commits ---------------------------------------------------------------------------

    def flush(self, on_done: Callable[[], None] | None = None) -> None:
        """Hand this step's writes, and the manifests due by now, to the writer thread (one
        group commit, in order)."""
        mono = self.clock.monotonic()
        for run, due in list(self._due.items()):
            if due <= mono:
                self._files.append((run.dir / "manifest.json", self._manifest(run)))
                if run.record_stale:
                    run.record_stale = False
                    self._files.append((run.dir / "run.json", atomic.dumps(run.record)))
                del self._due[run]
        if not self._files and not self._folders and not self._synced and on_done is None:
            return
        files, self._files = self._files, []
        folders, self._folders = self._folders, set()
        synced, self._synced = self._synced, []
        self._committer.submit(files, folders, on_done, synced)

    def landed(self) -> bool:
        """Wait until everything handed over is durable; False when some of it came back
        unwritten (`lost` then says what)."""
        self._committer.flush()
        return not self._unwritten and not self._unended

    def sync_then(self, unsynced: atomic.Unsynced, on_done: Callable[[], None]) -> None:
        """Make `unsynced` durable in the writer thread, in order with the engine's writes,
        then call `on_done` there."""
        self._committer.submit((), unsynced.folders, on_done, unsynced.files)

    def use_syncfs(self, roots: Sequence[Path]) -> None:
        self._committer.use_syncfs(roots)

    def close(self, timeout: float = CLOSE_LIMIT) -> bool:
        """Write what is pending and stop the writer thread, giving up after `timeout`
        seconds of failing writes (one ERROR line says what was not written). False when
        something was given up."""
        self.flush()
        done = self._committer.close(timeout)
        for u in self._unwritten:
            log.error("cannot write %s: %s; not written", u.path, u.error.strerror)
        self._unwritten.clear()
        return done

    # -- what could not be written ---------------------------------------------------------

    @property
    def error(self) -> OSError | None:
        """Why the spool cannot be written now (a full disk), or None."""
        return self.disk_error or self._committer.error

    def trouble(self, exc: OSError, what: str) -> None:
        """The spool cannot be written (environment_wide `exc`, while doing `what`)."""
        if self.disk_error is None:
            log.error(
                "cannot write the spool (%s: %s, errno %s); starting no task until it can: "
                "free space or fix permissions under %s",
                what,
                exc.strerror,
                exc.errno,
                self.spool.root,
            )
        self.disk_error = exc

    def paused(self, mono: float) -> bool:
        """True while the spool cannot be written; probes it every PROBE_INTERVAL."""
        if self.disk_error is None and self._committer.error is None:
            return False
        if mono < self._next_probe:
            return True
        self._next_probe = mono + PROBE_INTERVAL
        probe = self.spool.state / ".space-probe"
        try:
            atomic.write_volatile(probe, b"\0" * 65536)
            os.unlink(probe)
        except OSError:
            return True
        if self._committer.error is not None:
            return True
        if self.disk_error is not None:
            log.warning("the spool is writable again; starting tasks")
            self.disk_error = None
        return False

    def run_of(self, path: Path) -> str | None:
        """The run whose folder holds `path` (the committer's scope), None outside runs/."""
        parts, base = path.parts, self._runs_parts
        return parts[len(base)] if len(parts) > len(base) and parts[: len(base)] == base else None

    def _on_unwritten(self, unwritten: list[groupcommit.Unwritten]) -> None:
        """In the writer thread: hand what it could not write to the loop."""
        self._unwritten.extend(unwritten)
        self._wake()

    def lost(self) -> list[groupcommit.Unwritten]:
        """What the writer thread could not write for a reason of the path's own, for the
        loop to act on; a finished run whose end is among it gets its run.json written once
        more here (_rewrite_end)."""
        out = []
        while self._unwritten:
            out.append(self._unwritten.popleft())
        while self._unended:
            self._rewrite_end(*self._unended.popleft())
        return out
