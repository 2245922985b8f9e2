"""sd_notify against a real datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chute.observe.notify import Notifier


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def systemd_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket in tmp and the NOTIFY_SOCKET value that names it."""
    path = str(tmp_path / "notify")
    sock = _receiver(path)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """The same in the abstract namespace: NOTIFY_SOCKET=@name."""
    name = f"chute-test-{os.getpid()}-{tmp_path.name}"
    sock = _receiver(b"\0" + name.encode())
    yield sock, "@" + name
    sock.close()


def _fds() -> set[int]:
    """Open descriptors, less the one listdir used for /proc/self/fd (closed by now)."""
    return {int(fd) for fd in os.listdir("/proc/self/fd") if _is_open(int(fd))}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_each_call_sends_its_exact_datagram(systemd_socket: tuple[socket.socket, str]) -> None:
    sock, path = systemd_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        assert n.enabled
        n.ready()
        assert sock.recv(4096) == b"READY=1"
        n.ready("queued=0 running=0")
        assert sock.recv(4096) == b"READY=1\nSTATUS=queued=0 running=0"
        n.status("queued=3 running=2")
        assert sock.recv(4096) == b"STATUS=queued=3 running=2"
        n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        n.close()


def test_reloading_carries_the_monotonic_clock_in_microseconds(
    systemd_socket: tuple[socket.socket, str],
) -> None:
    sock, path = systemd_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, second = sock.recv(4096).decode().split("\n")
        assert first == "RELOADING=1"
        key, value = second.split("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(value) <= after
    finally:
        n.close()


def test_a_newline_in_a_status_cannot_inject_another_assignment(
    systemd_socket: tuple[socket.socket, str],
) -> None:
    sock, path = systemd_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        n.status("disk full\nREADY=1")
        assert sock.recv(4096) == b"STATUS=disk full READY=1"
    finally:
        n.close()


def test_abstract_socket_names_start_with_at(abstract_socket: tuple[socket.socket, str]) -> None:
    sock, name = abstract_socket
    n = Notifier({"NOTIFY_SOCKET": name})
    try:
        n.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    finally:
        n.close()


def test_the_socket_is_non_blocking_and_closed_on_exec(
    systemd_socket: tuple[socket.socket, str],
) -> None:
    _, path = systemd_socket
    before = _fds()
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        (fd,) = _fds() - before
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        n.close()
    assert _fds() == before


def test_without_notify_socket_every_call_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    before = _fds()
    n = Notifier({})
    assert not n.enabled
    assert n.watchdog_interval is None
    n.ready("up")
    n.status("x")
    n.watchdog()
    n.reloading()
    n.stopping()
    n.close()
    assert _fds() == before
    assert caplog.records == []


def test_reads_the_process_environment_by_default(
    systemd_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = systemd_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier()
    try:
        n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert n.watchdog_interval == 15.0
    finally:
        n.close()
    assert os.environ["NOTIFY_SOCKET"] == path, "the environment is left as it was"


def test_a_failed_send_is_logged_once_with_the_socket_and_the_reason(
    systemd_socket: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = systemd_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        sock.close()
        os.unlink(path)
        with caplog.at_level(logging.DEBUG, logger="chute.observe.notify"):
            n.ready("up")
            n.watchdog()
            n.status("still here")
            n.stopping()
    finally:
        n.close()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            f"NOTIFY_SOCKET={path}: cannot notify systemd: No such file or directory; "
            "further failures are not logged",
        )
    ]


def test_a_relative_socket_path_is_refused_once_and_sends_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = Notifier({"NOTIFY_SOCKET": "notify.sock"})
    assert not n.enabled
    n.ready()
    n.watchdog()
    assert [r.getMessage() for r in caplog.records] == [
        "NOTIFY_SOCKET=notify.sock: cannot notify systemd: not an absolute path or @abstract "
        "name; further failures are not logged"
    ]


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
    ids=["usec-only", "pid-is-ours", "pid-is-another-process", "zero", "garbage", "unset"],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid_only(
    systemd_socket: tuple[socket.socket, str], env: dict[str, str], interval: float | None
) -> None:
    _, path = systemd_socket
    n = Notifier({"NOTIFY_SOCKET": path, **env})
    try:
        assert n.watchdog_interval == interval
    finally:
        n.close()
