"""HTTP connections: accept, read each request's head under a total deadline, hand it on.

Owns: the listening socket; every connection until its request head (request line and
headers) has arrived, which costs no thread (one event thread watches them all, so a client
that sends a byte every few seconds holds nothing but a socket: slowloris); the request's
total deadline (REQUEST_TIMEOUT from accept to the last byte of the response, not per
`recv`); the cap on handler threads (MAX_REQUESTS); and the fast lane: a request the
endpoints answer without I/O (`/healthz`, `/metrics`) is answered by the event thread
itself, without a handler thread, so it is served whatever other clients do.
Not here: what the endpoints answer (chute.observe.http).
Diagnostics: clients that are too slow, too big or malformed get 408, 431 or 400 and are
closed; requests are logged at DEBUG only. Nothing a client does raises out of here.
Limits: one request per connection (HTTP/1.0 style: `Connection: close`). At most
MAX_PENDING connections may be sending their head at once; past that the oldest is closed.
A response written by the event thread that the client does not read within the deadline
is dropped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # seconds from accept to the response's last byte
MAX_REQUESTS = 16  # handler threads at once; more are answered 503
MAX_HEAD = 32 * 1024  # bytes of request line plus headers
MAX_PENDING = 256  # connections still sending their head


@dataclass(slots=True)
class Request:
    """A request whose head is in: the handler reads it again from `head`, then any body
    from the socket (through `reader()`), all before `deadline` (monotonic seconds)."""

    sock: socket.socket
    address: tuple[str, int]
    head: bytes  # everything read so far: the head, and the start of any body
    method: str
    target: str
    deadline: float

    def reader(self) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self.sock, self.head, self.deadline))

    def writer(self) -> io.BufferedWriter:
        return io.BufferedWriter(_DeadlineWriter(self.sock, self.deadline))


def response(
    status: int,
    reason: str,
    body: bytes,
    content_type: str,
    head_only: bool,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A whole `Connection: close` response."""
    lines = [
        f"HTTP/1.0 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + (b"" if head_only else body)


def _plain(status: int, reason: str, text: str) -> bytes:
    return response(status, reason, text.encode() + b"\n", "text/plain; charset=utf-8", False)


BUSY = _plain(503, "Service Unavailable", "too many requests at once; retry")
TOO_SLOW = _plain(408, "Request Timeout", f"request not complete within {REQUEST_TIMEOUT:g}s")
TOO_BIG = _plain(431, "Request Header Fields Too Large", f"request head over {MAX_HEAD} bytes")
MALFORMED = _plain(400, "Bad Request", "malformed request line")


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    data: bytearray
    out: bytes = b""  # a response being written by the event thread


Inline = Callable[[str, str], bytes | None]
"""(method, target) → a whole response the event thread sends at once, or None: hand the
request to a handler thread."""


class Listener:
    """Serve `address`: `inline` answers what it can at once, `handle(request)` runs in a
    handler thread for the rest (and must close nothing: the listener closes the socket)."""

    def __init__(
        self, address: tuple[str, int], *, inline: Inline, handle: Callable[[Request], None]
    ) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(address)
            self._sock.listen(128)
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self.server_address: tuple[str, int] = self._sock.getsockname()[:2]
        self._inline = inline
        self._handle = handle
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending: OrderedDict[int, _Conn] = OrderedDict()  # by accept order = deadline
        self._writing: dict[int, _Conn] = {}
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._selector.register(self._sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="chute-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._closing = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        for conn in [*self._pending.values(), *self._writing.values()]:
            conn.sock.close()
        self._pending.clear()
        self._writing.clear()
        self._selector.close()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the event thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing:
            now = time.monotonic()
            self._expire(now)
            deadlines = [c.deadline for c in self._writing.values()]
            if self._pending:
                deadlines.append(next(iter(self._pending.values())).deadline)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, events in self._selector.select(timeout):
                if key.fileobj is self._sock:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                elif events & selectors.EVENT_WRITE:
                    if (conn := self._writing.get(key.fd)) is not None:
                        self._write(conn)
                elif (conn := self._pending.get(key.fd)) is not None:
                    self._read(conn)  # (else: closed earlier in this batch)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the client waits in the backlog
                log.warning("http: cannot accept a connection: %s", exc.strerror)
                return
            sock.setblocking(False)
            conn = _Conn(sock, address[:2], time.monotonic() + REQUEST_TIMEOUT, bytearray())
            if len(self._pending) >= MAX_PENDING:
                self._drop(next(iter(self._pending.values())))
            self._pending[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, None)

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        conn.data += chunk
        end = _head_end(conn.data)
        if end < 0:
            if len(conn.data) > MAX_HEAD:
                self._reply(conn, TOO_BIG)
            return
        if end > MAX_HEAD:
            self._reply(conn, TOO_BIG)
            return
        line = bytes(conn.data[: conn.data.find(b"\n")]).rstrip(b"\r")
        words = line.decode("latin-1").split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            self._reply(conn, MALFORMED)
            return
        method, target = words[0], words[1]
        log.debug("http %s %s %s", conn.address[0], method, target)
        try:
            answer = self._inline(method, target)
        except Exception:
            log.exception("http: answering %s %s failed", method, target)
            answer = _plain(500, "Internal Server Error", "internal error; see the daemon log")
        if answer is not None:
            self._reply(conn, answer)
            return
        if not self._slots.acquire(blocking=False):
            self._reply(conn, BUSY)
            return
        self._forget(conn)
        request = Request(conn.sock, conn.address, bytes(conn.data), method, target, conn.deadline)
        try:
            threading.Thread(
                target=self._serve, args=(request,), name="chute-http-request", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had
            self._slots.release()
            conn.sock.close()

    def _reply(self, conn: _Conn, data: bytes) -> None:
        """Answer from this thread, without blocking: what the socket does not take now is
        written as the client reads, until the deadline."""
        self._forget(conn)
        conn.out = data
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[sent:]
        fd = conn.sock.fileno()
        if not conn.out:
            self._drop(conn)
        elif fd not in self._writing:
            self._writing[fd] = conn
            self._selector.register(conn.sock, selectors.EVENT_WRITE, None)

    def _expire(self, now: float) -> None:
        while self._pending:
            conn = next(iter(self._pending.values()))
            if conn.deadline > now:
                break
            self._reply(conn, TOO_SLOW)
        for conn in [c for c in self._writing.values() if c.deadline <= now]:
            self._drop(conn)

    def _forget(self, conn: _Conn) -> None:
        """Stop watching `conn` (its socket stays open)."""
        fd = conn.sock.fileno()
        if self._pending.pop(fd, None) is not None or self._writing.pop(fd, None) is not None:
            self._selector.unregister(conn.sock)

    def _drop(self, conn: _Conn) -> None:
        self._forget(conn)
        conn.sock.close()

    # -- handler threads ---------------------------------------------------------------------

    def _serve(self, request: Request) -> None:
        try:
            request.sock.setblocking(True)
            self._handle(request)
        except OSError as exc:  # the client went away, or ran out of time
            log.debug("http %s: %s", request.address[0], exc)
        except Exception:
            log.exception("http: serving %s %s failed", request.method, request.target)
        finally:
            with contextlib.suppress(OSError):
                request.sock.shutdown(socket.SHUT_RDWR)
            request.sock.close()
            self._slots.release()


def _head_end(data: bytearray) -> int:
    """The offset just past the blank line that ends a request head, or -1."""
    i = data.find(b"\r\n\r\n")
    if i >= 0:
        return i + 4
    i = data.find(b"\n\n")
    return i + 2 if i >= 0 else -1


def _remaining(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("request deadline passed")
    sock.settimeout(left)


class _DeadlineReader(io.RawIOBase):
    """What was read already, then the socket; no read outlives the request's deadline."""

    def __init__(self, sock: socket.socket, prefix: bytes, deadline: float) -> None:
        self._sock = sock
        self._prefix = memoryview(prefix)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        _remaining(self._sock, self._deadline)
        return self._sock.recv_into(buffer)


class _DeadlineWriter(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer, /) -> int:
        _remaining(self._sock, self._deadline)
        self._sock.sendall(data)
        return memoryview(data).nbytes
