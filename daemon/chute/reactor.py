"""The daemon's one wait: every descriptor it watches, calls handed in by other threads.

Owns: one selector and what each registered descriptor calls when it turns readable (or
writable); a queue of calls that other threads hand to the loop's thread (`post`); a
wake-up that is safe from any thread and from a signal handler (`wake`). Not here: what
the loop does between waits and how long it may wait (the daemon's `step` decides that),
timers (a duty is due when `step` says so, on the Clock it is given).

Why one: the loop must wake for whatever comes first (a task ends, a file is dropped, a
group commit is durable, a signal arrives, a deadline passes). With the wait inside one
component, everything else has to reach the loop through that component's wake-up; here
each source registers its descriptor, or posts the call it wants made, and the loop's
thread runs it.
Limits: callbacks run on the thread that calls `wait`, one at a time; a callback that
blocks stops the loop. `post` is for other threads; the loop's own code calls directly.
A callback that raises propagates out of `wait` (a chute bug: the daemon logs it).
"""

from __future__ import annotations

import contextlib
import os
import selectors
from collections import deque
from collections.abc import Callable
from typing import Protocol


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FileLike = int | HasFileno
Callback = Callable[[], None]
MAX_WAIT = 3600.0  # seconds one wait may last; the caller loops


class Reactor:
    """Register descriptors with a callback, post calls from other threads, wait."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._posted: deque[Callback] = deque()  # append and popleft are atomic
        self._closed = False

    def register(
        self, fileobj: FileLike, callback: Callback, events: int = selectors.EVENT_READ
    ) -> None:
        """Call `callback` on the loop's thread whenever `fileobj` is ready for `events`."""
        self._selector.register(fileobj, events, callback)

    def unregister(self, fileobj: FileLike) -> None:
        self._selector.unregister(fileobj)

    def post(self, fn: Callback) -> None:
        """Have the loop's thread call `fn` at its next wait (from any thread)."""
        self._posted.append(fn)
        self.wake()

    def wake(self) -> None:
        """End the current or next wait at once; safe in a signal handler."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def wait(self, timeout: float | None) -> int:
        """Wait up to `timeout` seconds (None: until something happens) for a descriptor,
        a post or a wake-up; run what is ready, then what was posted. Returns how many
        callbacks and posted calls ran."""
        ran = 0
        if self._posted:
            timeout = 0.0  # posted before this wait: run them without sleeping
        current = self._selector.get_map()
        if timeout is not None:
            timeout = min(timeout, MAX_WAIT)  # epoll takes int milliseconds: ~24.8 days
        for key, _ in self._selector.select(timeout):
            if current.get(key.fd) is not key:
                continue  # unregistered by an earlier callback of this same wait
            if key.fileobj == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
                continue
            callback: Callback = key.data
            callback()
            ran += 1
        while self._posted:
            self._posted.popleft()()
            ran += 1
        return ran

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
