"""The writer thread: group commits for the daemon's loop, in order, so the loop never
waits for a disk.

Owns: the Committer, its thread, the batches submitted to it (files, folders, files already
in place to sync) and their `on_done` callbacks, retrying a batch the filesystem refused,
and switching between fsyncs and syncfs(2) on a config reload. Not here: how one batch is
made durable (chute.store.groupcommit), one file (chute.store.atomic).
Crash safety: batches are committed one after another in the order they were submitted,
so a file submitted after another is never durable before it, and an `on_done` runs only
once its batch is durable: what it acknowledges survives a crash after it.
Diagnostics: a batch the filesystem refuses (environment_wide: no room, EIO) is one ERROR
line naming the path, the errno text and what to do, then one WARNING when writes succeed
again; a path that fails on its own goes to `on_unwritten` (else one ERROR line each);
what close() gives up is named in one ERROR line.
Limits: while a batch is held, later ones wait behind it in memory.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path

from chute.store import groupcommit

log = logging.getLogger(__name__)

RETRY_DELAY = 1.0
ABANDON_WAIT = 2.0  # seconds Committer.close waits for its thread after giving up


class Committer:
    """Group commit in a writer thread, so the caller's loop never waits for a disk.

    Batches are committed one after another in the order they were submitted, each with
    groupcommit.commit, so a file submitted after another is never durable before it. While one
    batch syncs, the next one grows: the busier the loop, the fewer syncs per file.
    A batch that fails for want of a filesystem (ENOSPC, EIO: environment_wide) is logged
    once and retried whole every RETRY_DELAY seconds, keeping later batches behind it:
    nothing is acknowledged out of order or lost while the process lives. A path that fails
    on its own (a run folder removed, a folder where a file goes) is dropped from its batch
    with the later files of its scope and handed to `on_unwritten`; the rest lands and
    nothing waits for it. `on_done` callbacks run in the writer thread after the batch they
    came with is done, `unwritten_scopes` telling them which scopes lost a file in it.
    """

    def __init__(
        self,
        name: str = "chute-writer",
        syncfs: Sequence[Path] = (),
        *,
        scope: Callable[[Path], Hashable | None] | None = None,
        on_unwritten: Callable[[list[groupcommit.Unwritten]], None] | None = None,
    ) -> None:
        """`syncfs`: roots of filesystems chute has to itself (groupcommit.own_filesystems);
        every batch then costs two syncfs(2) each, whatever its size. `scope` and
        `on_unwritten`: see groupcommit.commit; `on_unwritten` is called in the writer
        thread (without it, each path is one ERROR line)."""
        self._filesystems = _open_roots(syncfs)
        self._next_filesystems: list[int] | None = None
        self._scope = scope
        self._on_unwritten = on_unwritten
        self._cond = threading.Condition()
        self._files: list[tuple[Path, bytes]] = []
        self._folders: set[Path] = set()
        self._callbacks: list[Callable[[], None]] = []
        self._synced: list[Path] = []
        self._submitted = 0
        self._committed = 0
        self._closing = False
        self._abandon = False  # close() ran out of time: give up what is not written
        self.error: OSError | None = None
        self.unwritten_scopes: dict[Hashable, groupcommit.Unwritten] = {}
        """While a batch's `on_done` callbacks run: its scopes that lost a file, each with
        the first such file."""
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self,
        files: Iterable[tuple[Path, bytes]],
        folders: Iterable[Path] = (),
        on_done: Callable[[], None] | None = None,
        synced: Iterable[Path] = (),
    ) -> None:
        """Commit `files`; also fsync `synced` (already in place by write_volatile) and their
        folders before any of `files` is renamed, so they are durable before what follows."""
        with self._cond:
            self._files.extend(files)
            self._folders.update(folders)
            self._synced.extend(synced)
            if on_done is not None:
                self._callbacks.append(on_done)
            self._submitted += 1
            self._cond.notify_all()

    def use_syncfs(self, roots: Sequence[Path]) -> None:
        """Switch how batches are synced (config reload), from the next batch on."""
        fds = _open_roots(roots)
        with self._cond:
            if self._next_filesystems is not None:
                _close_all(self._next_filesystems)
            self._next_filesystems = fds

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is durable; False on timeout."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._committed >= target, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Write what was submitted, then stop the writer thread. With `timeout`, give up
        after that many seconds (writes failing for want of a filesystem): what is not
        written is then named in one ERROR line and lost, so its owner must be able to redo
        it (the daemon's runs resume from queue/). False when something was given up."""
        landed = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._abandon = not landed
            self._cond.notify_all()
        self._thread.join(None if landed else ABANDON_WAIT)
        if self._thread.is_alive():
            log.error("the writer thread is stuck in a write to the spool; exiting without it")
        else:
            _close_all(self._filesystems + (self._next_filesystems or []))
            self._filesystems, self._next_filesystems = [], None
        return landed

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._submitted > self._committed or self._closing)
                if self._abandon or (self._submitted == self._committed and self._closing):
                    self._give_up(self._files)
                    return
                files, self._files = self._files, []
                folders, self._folders = self._folders, set()
                callbacks, self._callbacks = self._callbacks, []
                synced, self._synced = list(dict.fromkeys(self._synced)), []
                upto = self._submitted
                if self._next_filesystems is not None:
                    _close_all(self._filesystems)
                    self._filesystems, self._next_filesystems = self._next_filesystems, None
            while True:
                try:
                    unwritten = groupcommit.commit(
                        _last_write_wins(files),
                        folders=folders,
                        synced=synced,
                        filesystems=self._filesystems,
                        scope=self._scope,
                    )
                    break
                except OSError as exc:
                    if self.error is None:
                        log.error(
                            "cannot write %s: %s (errno %s); holding %d file(s) in memory and "
                            "retrying every %.0fs: free space or fix the filesystem",
                            exc.filename or "the spool",
                            exc.strerror,
                            exc.errno,
                            len(files),
                            RETRY_DELAY,
                        )
                    self.error = exc
                    with self._cond:
                        if self._cond.wait_for(lambda: self._abandon, RETRY_DELAY):
                            self._give_up(files + self._files)
                            return
            if self.error is not None:
                log.warning("writes to the spool succeed again")
                self.error = None
            self._report(unwritten)
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    log.exception("callback after commit failed")
            self.unwritten_scopes = {}
            with self._cond:
                self._committed = upto
                self._cond.notify_all()

    def _report(self, unwritten: list[groupcommit.Unwritten]) -> None:
        scopes: dict[Hashable, groupcommit.Unwritten] = {}
        for u in unwritten:
            key = None if self._scope is None else self._scope(u.path)
            if key is not None:
                scopes.setdefault(key, u)
        self.unwritten_scopes = scopes
        if not unwritten:
            return
        if self._on_unwritten is None:
            for u in unwritten:
                log.error("cannot write %s: %s", u.path, u.error.strerror)
            return
        try:
            self._on_unwritten(unwritten)
        except Exception:
            log.exception("handling unwritten files failed")

    def _give_up(self, files: list[tuple[Path, bytes]]) -> None:
        if not files:
            return
        paths = list(dict.fromkeys(str(path) for path, _ in files))
        log.error(
            "exiting with %d file(s) not written (%s): %s%s",
            len(paths),
            self.error.strerror if self.error is not None else "shutting down",
            ", ".join(paths[:10]),
            ", ..." if len(paths) > 10 else "",
        )


def _open_roots(roots: Sequence[Path]) -> list[int]:
    return [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for root in roots]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _last_write_wins(files: list[tuple[Path, bytes]]) -> list[tuple[Path, bytes]]:
    """Drop earlier versions of a file written twice in one batch (a manifest, run.json)."""
    last = {path: i for i, (path, _) in enumerate(files)}
    return [f for i, f in enumerate(files) if last[f[0]] == i]
