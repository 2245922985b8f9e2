"""Fixtures for tests that start real processes: a leak fence, a manual clock, an executor.

Register with `pytest_plugins = ["fixtures_procs"]` in conftest.py (tests/ is on sys.path),
or import the fixtures into a test module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from chute.clock import Clock
from chute.execution.executor import Result
from chute.execution.local import LocalExecutor
from chute.reactor import Reactor


class ManualClock(Clock):
    """Monotonic time that moves only when a test says so (trio's MockClock, by hand)."""

    def __init__(self, start: float = 1000.0):
        self.t = start

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class PolledExecutor(LocalExecutor):
    """A LocalExecutor driven as the daemon drives one (its reactor's waits, then `tick`),
    with `poll(timeout)` to collect what ended: the tests' view of it."""

    def __init__(self, **kwargs: object) -> None:
        self.reactor = Reactor()
        self.ended: list[Result] = []
        super().__init__(reactor=self.reactor, on_result=self.ended.append, **kwargs)  # type: ignore[arg-type]

    def poll(self, timeout: float) -> list[Result]:
        """The Results of tasks that ended, waiting up to `timeout` seconds for the first."""
        until = time.monotonic() + timeout
        while True:
            due = self.tick(self._clock.monotonic())
            left = until - time.monotonic()
            if self.ended or left <= 0:
                got, self.ended[:] = list(self.ended), []
                return got
            self.reactor.wait(left if due is None else min(left, due))

    def close(self) -> None:
        super().close()
        self.reactor.close()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `check` until it is true; fail saying what we waited for."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout}s for {what}")
        time.sleep(0.01)


def _descendants() -> dict[int, str]:
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            found[p.pid] = f"pid {p.pid} {p.status()} {' '.join(p.cmdline())[:120]}"
        except psutil.Error:
            continue
    return found


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a child process (or a descendant of one) behind.

    Processes that exist when the test starts are not counted, so a session-scoped fixture
    that starts a process should be set up before the first test that uses it ends.
    """
    before = set(_descendants())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = {pid: text for pid, text in _descendants().items() if pid not in before}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for pid in leaked:
        try:
            psutil.Process(pid).kill()
            os.waitpid(pid, 0)
        except (psutil.Error, ChildProcessError):
            pass
    assert not leaked, "test left processes behind:\n" + "\n".join(leaked.values())


@pytest.fixture
def no_leaked_fds() -> Iterator[None]:
    """Fail a test that leaves a descriptor open (use before fixtures that open some)."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    details = []
    for fd in sorted(set(os.listdir("/proc/self/fd")) - before, key=int):
        try:
            details.append(f"fd {fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue
    assert not details, "test left descriptors open:\n" + "\n".join(details)


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def make_executor() -> Iterator[Callable[..., PolledExecutor]]:
    """PolledExecutor(**kwargs), closed at the end of the test (kill_grace 0.5s by default)."""
    made: list[PolledExecutor] = []

    def make(**kwargs: object) -> PolledExecutor:
        kwargs.setdefault("kill_grace", 0.5)
        kwargs.setdefault("max_workers", 2)
        ex = PolledExecutor(**kwargs)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.close()


@pytest.fixture
def executor(make_executor: Callable[..., PolledExecutor]) -> PolledExecutor:
    return make_executor()
