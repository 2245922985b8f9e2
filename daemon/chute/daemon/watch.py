"""Noticing files in incoming/ and schedules/: inotify events as hints, scans as the truth.

Owns: the inotify watch on the loop's reactor (`watch: auto`), what its events become
(names for admission to take, schedules whose file was deleted), and how often the daemon
scans the folders anyway: every `rescan_interval` with inotify, every POLL_INTERVAL
without it, at once after the event queue overflowed. Not here: reading the events
(chute.intake.watch.Watcher), the scans (chute.daemon.admission, chute.daemon.fires), the
timer that runs them (chute.daemon.service).
Diagnostics: inotify that cannot be had (no inotify in the libc, the watch limit) is one
ERROR line saying which knob to turn, then scans every POLL_INTERVAL; an overflowed event
queue is one WARNING line and a count in chute_inotify_overflows_total.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from chute.intake.watch import Watcher
from chute.observe.metrics import Metrics
from chute.reactor import Reactor
from chute.store.spool import Spool

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between scans of incoming/ without inotify (`watch: poll`)


class Watch:
    """The spool's folders as the loop watches them. `hint(names)`: these names may be ready
    in incoming/; `unschedule(name)`: the schedule's file was deleted."""

    def __init__(
        self,
        spool: Spool,
        reactor: Reactor,
        metrics: Metrics,
        *,
        hint: Callable[[Iterable[str]], None],
        unschedule: Callable[[str], None],
    ) -> None:
        self.spool = spool
        self.reactor = reactor
        self.metrics = metrics
        self._hint = hint
        self._unschedule = unschedule
        self.watcher: Watcher | None = None
        self.overflowed = False  # events were lost: scan at once (the scan clears it)
        self.closed = False  # stopping: intake is closed, the next start's scan takes them

    def start(self, mode: str) -> None:
        """`mode`: the config's `watch` (auto: inotify when it can be had; poll: scans only)."""
        if mode != "auto":
            return
        try:
            self.watcher = Watcher(self.spool)
        except OSError as exc:
            log.error("%s; falling back to scans every %.0fs", exc, POLL_INTERVAL)
            return
        self.reactor.register(self.watcher.fileno(), self._read)

    @property
    def kind(self) -> str:
        return "inotify" if self.watcher is not None else "poll"

    def scan_every(self, rescan_interval: float) -> float:
        """inotify misses little (rescan_interval is the safety net); a poll is all there is."""
        return rescan_interval if self.watcher is not None else POLL_INTERVAL

    def _read(self) -> None:
        assert self.watcher is not None
        names, deleted, overflowed = self.watcher.read()
        if self.closed:
            return
        self._hint(names)
        for name in deleted:
            self._unschedule(name.rsplit(".", 1)[0])
        if overflowed:
            self.metrics.inotify_overflowed()
            log.warning("inotify queue overflowed; rescanning incoming/")
            self.overflowed = True

    def close(self) -> None:
        if self.watcher is not None:
            self.reactor.unregister(self.watcher.fileno())
            self.watcher.close()
            self.watcher = None
