"""Retention: what goes from the spool, and when (runs/, pipelines/, rejected/, cache/).

Owns: the retention rules (the config's `retention:`) and removing what they condemn:
finished run folders, the pipelines/<name>/latest links (and emptied folders) of removed
runs, old rejected/ files with their .error.json, and cache/ entries past their age or
beyond the cache's size. Not here: a run folder's files and finding runs (chute.store.rundir),
what a cache entry holds (chute.engine.cache: here an entry is only a folder
cache/<key>/), when a pass runs (the daemon, every minute; `chute gc`).

Rules (the README quotes them):
- Never removed: a run not finished (its run.json not final, or not as chute writes it),
  one still in queue/ (an interrupted run that resumes), one the caller names `active`,
  and the target of runs/latest.
- A run finished longer than `max_age` ago is removed, whatever else.
- Within `max_age`, a run stays while it is among the newest `keep_runs` run folders or is
  its pipeline's latest (pipelines/<name>/latest); the others are removed.
- A pipeline's latest link goes with the run it points at (then its folder, if empty). A
  sweep (`chute gc`, the daemon's first pass) also removes links to runs that are gone and
  empty pipeline folders.
- rejected/<x> with its <x>.error.json goes once the error.json is older than
  `rejected_max_age`: <x> first, so a crash never leaves a file without its reason (intake
  would write it a new one). A file still without its error.json is intake's to repair.
- cache/<key> goes once it was last written or used (its folder's mtime: the engine
  touches an entry it stores or hits) longer than `cache_max_age` ago; then, while cache/
  holds more than `cache_max_size` bytes (disk usage), the least recently used go first.
  An entry touched within CACHE_GRACE never goes: a store or hit may be under way, in the
  daemon or in a `chute run`.
Order and cost: oldest first, at most `limit` removals per pass shared in turn between
runs, rejected files and cache entries (one kind's backlog never starves another), each
counted once; finishing a .gc- leftover counts too. A run's run.json is read only when the
run may go: one whose id is younger than `max_age` and that is among the newest or a
pipeline's latest is kept unread. The cache's size is measured entry by entry (each inode
once, no link followed), and the daemon keeps the measures of idle entries between passes
(`sizes`, valid while an entry's folder mtime is unchanged): a pass over 5,000 entries
takes ~50-100 ms, where measuring them all again took ~250 ms.
Crash safety: a run folder or cache entry is renamed to .gc-<name> in its own folder before
it is deleted, so whoever looks sees it whole or not at all, and a crash never leaves half
of one under its name; every pass first finishes the .gc- leftovers of any remover.
Several removers may run at once (the daemon's pass and `chute gc`): an item another took
first is skipped (its rename finds nothing), and a latest link is removed only while it
still points at the removed run (it is renamed aside, looked at, and put back if a new run
took it meanwhile; an aside left by a dead remover is removed by the next sweep). Removals
are not synced: one a power loss undoes is done again. Crash points: gc.renamed (a run
folder), gc.entry_renamed (a cache entry), gc.link_aside, gc.rejected_file_removed.
Diagnostics: none of its own; what cannot be removed (permissions, a task's odd files)
stays, and the next pass tries again.
Limits: a reader of a cache entry that the rename overtakes finds its files gone (ENOENT)
and must treat that as a miss; CACHE_GRACE keeps the window to entries idle for an hour.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from chute import names
from chute.config import Config
from chute.faults import crash_point
from chute.intake.rejections import ERROR_SUFFIX
from chute.store import queue, rundir
from chute.store.spool import Spool

GC_PREFIX = ".gc-"  # runs/.gc-<id>, cache/.gc-<key>: being removed (renamed out of view first)
CACHE_GRACE = 3600.0
"""Seconds after its last store or hit during which a cache entry is never removed."""


@dataclass(frozen=True, slots=True)
class Rules:
    """The config's `retention:` (durations in seconds; cache_max_size None: no bound)."""

    keep_runs: int
    max_age: float
    rejected_max_age: float
    cache_max_age: float
    cache_max_size: int | None

    @classmethod
    def of(cls, config: Config) -> Rules:
        return cls(
            keep_runs=config.keep_runs,
            max_age=config.max_age,
            rejected_max_age=config.rejected_max_age,
            cache_max_age=config.cache_max_age,
            cache_max_size=config.cache_max_size,
        )


@dataclass(slots=True)
class Removed:
    """What one pass removed, by kind, oldest first; `more`: the limit cut it short."""

    runs: list[str] = field(default_factory=list)  # run ids
    links: list[str] = field(default_factory=list)  # pipeline names whose latest link went
    rejected: list[str] = field(default_factory=list)  # file names in rejected/
    cache: list[str] = field(default_factory=list)  # cache keys
    leftovers: int = 0  # .gc- folders a crashed remover left, finished
    more: bool = False

    def __len__(self) -> int:
        return len(self.runs) + len(self.rejected) + len(self.cache) + self.leftovers


def gc(
    spool: Spool,
    rules: Rules,
    *,
    now: float,
    limit: int | None = None,
    active: Collection[str] = frozenset(),
    sweep: bool = False,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> Removed:
    """One retention pass over the spool at `now` (epoch seconds), by `rules`: at most
    `limit` removals (None: all there is). `active`: run ids never to remove (the daemon's
    runs in progress). `sweep`: also remove every pipelines/ link to a run that is gone.
    `sizes`: the cache entries' sizes a previous pass measured, kept up to date here (key
    -> (folder mtime in ns, bytes)), so a pass only measures the entries that changed."""
    out = Removed()
    budget = limit if limit is not None else -1
    for folder in (spool.runs, spool.cache):
        for name in _leftovers(folder):
            if budget == 0:
                out.more = True
                return out
            rundir.remove_tree(folder / name)
            out.leftovers += 1
            budget -= 1
    if sweep:
        _sweep_links(spool, out)
    kinds: list[Iterator[None]] = [
        _runs(spool, rules, now, active, out),
        _rejected(spool, rules, now, out),
        _cache(spool, rules, now, out, {} if sizes is None else sizes),
    ]
    while kinds:  # one removal of each kind in turn
        for kind in list(kinds):
            if budget == 0:
                out.more = True
                return out
            if next(kind, StopIteration) is StopIteration:
                kinds.remove(kind)
            else:
                budget -= 1
    return out


# -- runs ----------------------------------------------------------------------------------


def _runs(
    spool: Spool, rules: Rules, now: float, active: Collection[str], out: Removed
) -> Iterator[None]:
    ids = rundir.run_ids(spool)
    newest = set(ids[-rules.keep_runs :]) if rules.keep_runs > 0 else set()
    # A run id starts with its creation time (UTC), in whole seconds: one of a second after
    # the cutoff's was made after the cutoff, so it cannot have finished before it.
    young = time.strftime("%Y%m%d_%H%M%S", time.gmtime(max(0.0, now - rules.max_age + 1)))
    current = _target(spool.runs / "latest")
    latest: set[str] | None = None  # the pipelines' latest runs, read when first needed

    def kept_within_age(run_id: str) -> bool:
        nonlocal latest
        if run_id in newest:
            return True
        if latest is None:
            latest = _pipeline_latest(spool)
        return run_id in latest

    for run_id in ids:
        if run_id in active or run_id == current or not names.is_run_id(run_id):
            continue
        if run_id >= young and kept_within_age(run_id):
            continue
        record = _final_record(spool.runs / run_id)
        if record is None:
            continue  # not finished, or not a run.json chute wrote: never removed
        if queue.exists(spool, run_id):
            continue  # accepted and not done (an interrupted run that will resume)
        if now - record[0] <= rules.max_age and kept_within_age(run_id):
            continue
        pipeline = record[1]
        if pipeline is not None and _unlink_latest(spool.pipelines / pipeline, run_id):
            out.links.append(pipeline)
        doomed = spool.runs / f"{GC_PREFIX}{run_id}"
        try:
            os.rename(spool.runs / run_id, doomed)
        except OSError:
            continue  # another remover took it first (or it cannot be moved: next pass)
        # Crash point: the run is out of view under runs/.gc-<id>, not yet deleted; the next
        # pass (the daemon's retention or `chute gc`) finishes it.
        crash_point("gc.renamed")
        rundir.remove_tree(doomed)
        out.runs.append(run_id)
        yield


def _final_record(folder: Path) -> tuple[float, str | None] | None:
    """(when the run in `folder` finished, epoch s; its pipeline if of a name's form), or
    None when it has not finished, or its run.json cannot be read as chute writes it."""
    try:
        rec = rundir.read_json(folder / "run.json")
        if not isinstance(rec, dict) or rec.get("state") not in rundir.FINAL_RUN_STATES:
            return None
        stamp = rec.get("finished_at") or rec.get("created_at")
        finished = datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except (OSError, ValueError):
        return None
    pipeline = rec.get("pipeline")
    return finished, pipeline if names.is_name(pipeline) else None


def _target(link: Path) -> str | None:
    """The name a link points at (its last component), None if it is not a link."""
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def _pipeline_latest(spool: Spool) -> set[str]:
    """The run ids every pipelines/<name>/latest points at."""
    out: set[str] = set()
    with contextlib.suppress(OSError), os.scandir(spool.pipelines) as entries:
        for entry in entries:
            target = _target(Path(entry.path) / "latest")
            if target is not None:
                out.add(target)
    return out


def _unlink_latest(folder: Path, run_id: str) -> bool:
    """Remove folder/latest if it points at `run_id`, then `folder` if that left it empty.

    Renamed aside first and looked at there: a run made meanwhile may have pointed the link
    at itself (a rename over it), and that link is put back, unless a newer one is in place
    already."""
    link = folder / "latest"
    if _target(link) != run_id:
        return False
    aside = folder / f"{GC_PREFIX}latest-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(link, aside)
    except OSError:
        return False  # gone meanwhile (another remover), or the folder with it
    # Crash point: the link is aside (a .gc- name the next sweep removes); <name>/latest
    # answers "no run yet" until the pipeline's next run.
    crash_point("gc.link_aside")
    gone = _target(aside) == run_id
    if not gone:
        with contextlib.suppress(OSError):  # EEXIST: a newer link is in place
            os.link(aside, link, follow_symlinks=False)
    with contextlib.suppress(OSError):
        os.unlink(aside)
    with contextlib.suppress(OSError):  # ENOTEMPTY: a new run's link, or a temp one
        os.rmdir(folder)
    return gone


def _sweep_links(spool: Spool, out: Removed) -> None:
    """Remove each pipelines/<name>/latest whose run is gone, .gc- leftovers of
    _unlink_latest, and the pipeline folders that leaves empty."""
    try:
        folders = [e.name for e in os.scandir(spool.pipelines) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for name in sorted(folders):
        folder = spool.pipelines / name
        with contextlib.suppress(OSError):
            for entry in os.listdir(folder):
                if entry.startswith(GC_PREFIX) and not _aside_in_use(entry):
                    os.unlink(folder / entry)
        target = _target(folder / "latest")
        if (
            target is not None
            and not os.path.lexists(spool.runs / target)
            and _unlink_latest(folder, target)
        ):
            out.links.append(name)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _aside_in_use(name: str) -> bool:
    """Whether the remover that set the link `name` aside (.gc-latest-<pid>-<hex>) may still
    put it back: its process lives (a pid reused meanwhile keeps it until that one ends)."""
    pid = name.removeprefix(f"{GC_PREFIX}latest-").partition("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, another user's
    return True


# -- rejected/ -----------------------------------------------------------------------------


def _rejected(spool: Spool, rules: Rules, now: float, out: Removed) -> Iterator[None]:
    cutoff = now - rules.rejected_max_age
    old: list[tuple[float, str]] = []
    with contextlib.suppress(OSError), os.scandir(spool.rejected) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(ERROR_SUFFIX):
                continue
            with contextlib.suppress(OSError):
                mtime = entry.stat(follow_symlinks=False).st_mtime
                if mtime < cutoff:
                    old.append((mtime, entry.name))
    for _, report in sorted(old):
        name = report[: -len(ERROR_SUFFIX)]
        _remove_any(spool.rejected / name)
        # Crash point: the file is gone, its .error.json not yet; the next pass removes it.
        crash_point("gc.rejected_file_removed")
        try:
            os.unlink(spool.rejected / report)
        except FileNotFoundError:
            continue  # another remover took it first
        except OSError:
            continue
        out.rejected.append(name)
        yield


def _remove_any(path: Path) -> None:
    """Remove `path`, whatever a user or a task made it (a file, a link, a FIFO, a tree)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):
        rundir.remove_tree(path)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- cache/ --------------------------------------------------------------------------------


def _cache(
    spool: Spool, rules: Rules, now: float, out: Removed, sizes: dict[str, tuple[int, int]]
) -> Iterator[None]:
    entries: list[tuple[float, str, int]] = []  # (last written or used, key, mtime in ns)
    with contextlib.suppress(OSError), os.scandir(spool.cache) as found:
        for entry in found:
            if entry.name.startswith("."):
                continue  # a remover's .gc- leftover, or a writer's temp name
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                entries.append((st.st_mtime, entry.name, st.st_mtime_ns))
    entries.sort()
    for key in set(sizes) - {key for _, key, _ in entries}:
        del sizes[key]
    idle = [(t, key) for t, key, _ in entries if t < now - CACHE_GRACE]
    expired = [key for t, key in idle if t < now - rules.cache_max_age]
    for key in expired:
        sizes.pop(key, None)
        if _remove_entry(spool.cache, key):
            out.cache.append(key)
            yield
    if rules.cache_max_size is None:
        return
    gone = set(expired)
    total = 0
    for t, key, mtime_ns in entries:
        if key in gone:
            continue
        known = sizes.get(key)
        if known is None or known[0] != mtime_ns:
            known = (mtime_ns, disk_usage(spool.cache / key))
            if t < now - CACHE_GRACE:  # a fresh entry may still be filling: measured again
                sizes[key] = known
        total += known[1]
    for _, key in idle:
        if total <= rules.cache_max_size:
            return
        if key in gone:
            continue
        total -= sizes.pop(key, (0, 0))[1]
        if _remove_entry(spool.cache, key):
            out.cache.append(key)
            yield


def _remove_entry(cache: Path, key: str) -> bool:
    doomed = cache / f"{GC_PREFIX}{key}"
    try:
        os.rename(cache / key, doomed)
    except OSError:
        return False  # another remover took it first
    # Crash point: the entry is out of view under cache/.gc-<key>; the next pass deletes it.
    crash_point("gc.entry_renamed")
    _remove_any(doomed)
    return True


def disk_usage(top: Path) -> int:
    """Bytes `top` takes on disk (allocated blocks), counting each inode once; no link is
    followed, and what cannot be read counts as nothing."""
    total = 0
    seen: set[tuple[int, int]] = set()
    todo = [str(top)]
    while todo:
        path = todo.pop()
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(OSError):
                todo.extend(os.path.join(path, name) for name in os.listdir(path))
    return total


def _leftovers(folder: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if n.startswith(GC_PREFIX))
    except OSError:
        return []
