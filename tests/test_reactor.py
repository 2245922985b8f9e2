"""The reactor: one wait for descriptors, posted calls and wake-ups, each on the loop's thread."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from chute.reactor import Reactor


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


def test_a_readable_descriptor_runs_its_callback_on_the_waiting_thread(reactor: Reactor) -> None:
    r, w = os.pipe()
    seen: list[tuple[bytes, int]] = []
    reactor.register(r, lambda: seen.append((os.read(r, 10), threading.get_ident())))
    assert reactor.wait(0) == 0
    os.write(w, b"x")
    assert reactor.wait(5) == 1
    assert seen == [(b"x", threading.get_ident())]
    reactor.unregister(r)
    os.close(r)
    os.close(w)


def test_a_post_from_another_thread_ends_a_wait_without_timeout(reactor: Reactor) -> None:
    ran: list[int] = []
    poster = threading.Timer(0.1, lambda: reactor.post(lambda: ran.append(threading.get_ident())))
    poster.start()
    started = time.monotonic()
    assert reactor.wait(None) == 1
    poster.join()
    assert time.monotonic() - started < 5
    assert ran == [threading.get_ident()]


def test_what_was_posted_before_a_wait_runs_without_sleeping(reactor: Reactor) -> None:
    ran: list[str] = []
    reactor.post(lambda: ran.append("a"))
    reactor.post(lambda: ran.append("b"))
    started = time.monotonic()
    assert reactor.wait(30) == 2
    assert time.monotonic() - started < 5
    assert ran == ["a", "b"]


def test_a_wake_from_a_signal_handler_ends_the_wait(reactor: Reactor) -> None:
    old = signal.signal(signal.SIGUSR1, lambda *_: reactor.wake())
    try:
        threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
        started = time.monotonic()
        assert reactor.wait(30) == 0
        assert time.monotonic() - started < 5
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_a_callback_that_unregisters_another_ready_descriptor_stops_its_call(
    reactor: Reactor,
) -> None:
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()
    calls: list[int] = []

    def first() -> None:
        calls.append(1)
        reactor.unregister(r2)
        reactor.unregister(r1)

    def second() -> None:
        calls.append(2)
        reactor.unregister(r1)
        reactor.unregister(r2)

    reactor.register(r1, first)
    reactor.register(r2, second)
    os.write(w1, b"x")
    os.write(w2, b"x")
    assert reactor.wait(5) == 1
    assert len(calls) == 1
    for fd in (r1, w1, r2, w2):
        os.close(fd)
