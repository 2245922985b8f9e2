"""The inotify watch on incoming/ and schedules/, read on the daemon's loop.

Owns: one inotify descriptor: which names became ready in incoming/ (closed after writing,
renamed in, or made in place), which schedules/<name>.yaml files were deleted or moved away,
and whether events were lost (the queue overflowed). Not here: taking the files
(chute.intake.drops), when to rescan (chute.daemon.admission), what a deleted schedule
means (chute.daemon.fires).
Crash safety: reads only. Events are hints: the rescans at start-up and after an overflow
are the truth (Postfix pickup).
Diagnostics: a watch that cannot start raises OSError naming the limit to raise (the
sysctl, LimitNOFILE=); the daemon logs it and polls incoming/ instead.
Limits: if incoming/ itself is removed or replaced, the watch goes quiet; rescans still work.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

from chute.intake.filenames import is_candidate
from chute.store.spool import Spool


class Watcher:
    """inotify on incoming/ (ready files) and schedules/ (deletions), read on the caller's loop.

    Raw events, not watchdog's Observer: that one holds an unmatched moved-from for 0.5 s and
    queues every later event behind it, and each claim is such a moved-from.
    """

    def __init__(self, spool: Spool) -> None:
        try:
            from watchdog.observers.inotify_c import (
                InotifyConstants,
                inotify_add_watch,
                inotify_init,
            )
        except (ImportError, OSError) as exc:  # no inotify in this libc
            raise OSError(
                errno.ENOSYS, f"inotify is not available ({exc}); set watch: poll in the config"
            ) from None
        c = InotifyConstants
        self._overflow_mask = c.IN_Q_OVERFLOW
        fd = inotify_init()
        if fd < 0:
            raise _inotify_error(ctypes.get_errno(), "inotify_init", None)
        self._fd = fd
        try:
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
            watches: dict[int, tuple[str, int]] = {}
            for folder, mask in (
                # IN_CREATE too: a FIFO or symlink made in place sends nothing else; a
                # regular file still open for writing is "not ready" to claim anyway.
                (spool.incoming, c.IN_CLOSE_WRITE | c.IN_MOVED_TO | c.IN_CREATE),
                (spool.schedules, c.IN_DELETE | c.IN_MOVED_FROM),
            ):
                wd = inotify_add_watch(fd, os.fsencode(folder), mask | c.IN_ONLYDIR)
                if wd < 0:
                    raise _inotify_error(ctypes.get_errno(), "inotify_add_watch", folder)
                watches[wd] = (folder.name, mask)
        except BaseException:
            os.close(fd)
            raise
        self._watches = watches

    def fileno(self) -> int:
        return self._fd

    def read(self) -> tuple[list[str], list[str], bool]:
        """Drain pending events: (incoming names ready, schedule names deleted, overflowed).

        Names are de-duplicated in arrival order and filtered with is_candidate (and, in
        schedules/, to the `<name>.yaml` files intake writes there). On overflow
        events were lost: the caller must rescan incoming/ and schedules/.
        """
        ready: dict[str, None] = {}
        deleted: dict[str, None] = {}
        overflowed = False
        for _ in range(64):  # at most 4 MiB per call; the fd stays readable for the rest
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            pos = 0
            while pos + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size : pos + _EVENT.size + length]
                pos += _EVENT.size + length
                if mask & self._overflow_mask:
                    overflowed = True
                    continue
                watch = self._watches.get(wd)
                if watch is None or not mask & watch[1]:
                    continue
                name = os.fsdecode(raw.split(b"\0", 1)[0])
                if not is_candidate(name):
                    continue
                if watch[0] == "incoming":
                    ready[name] = None
                elif name.endswith(".yaml"):  # schedules/<metadata.name>.yaml only
                    deleted[name] = None
        return list(ready), list(deleted), overflowed

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


def _inotify_error(err: int, call: str, folder: Path | None) -> OSError:
    where = f" {folder}" if folder is not None else ""
    text = os.strerror(err)
    if err == errno.ENOSPC:
        hint = (
            "the inotify watch limit is reached: raise fs.inotify.max_user_watches "
            "(sysctl -w fs.inotify.max_user_watches=524288)"
        )
    elif err == errno.EMFILE:
        hint = (
            "the inotify instance limit (or the open-file limit) is reached: raise "
            "fs.inotify.max_user_instances (sysctl -w fs.inotify.max_user_instances=1024) "
            "or LimitNOFILE="
        )
    elif err == errno.ENOSYS:
        hint = "this kernel has no inotify"
    else:
        hint = "check fs.inotify.max_user_watches and fs.inotify.max_user_instances"
    return OSError(
        err, f"{call}{where}: {text} (errno {err}); {hint}; until then intake polls incoming/"
    )
