"""sd_notify: tell systemd that the daemon is ready, alive, reloading or stopping.

Owns: one AF_UNIX datagram socket to $NOTIFY_SOCKET (a path, or `@name` in the abstract
namespace) and the watchdog interval from $WATCHDOG_USEC/$WATCHDOG_PID. Not here: when to
send (the daemon's loop), what the unit expects (systemd/chute.service: Type=notify,
WatchdogSec=).
Diagnostics: a failed send is an environment problem that costs nothing but the notice,
so it is logged once at WARNING with the socket and the errno text, then ignored
(sdnotify swallows every error silently; libsystemd returns it to a caller that rarely
looks). Without $NOTIFY_SOCKET every call is a no-op. The environment is left as it is:
tasks get a clean environment anyway.
Limits: `vsock:` addresses (systemd 254, for VMs) are not supported; they log once too.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if self._path.startswith("@"):
            self._address = b"\0" + os.fsencode(self._path[1:])
        elif self._path.startswith("/"):
            self._address = self._path
        elif self._path:
            self._warn("not an absolute path or @abstract name")
        if self._address is not None:
            # Non-blocking: a stalled systemd must never stall the scheduling loop.
            # CLOEXEC (Python's default, made explicit): tasks must not inherit it.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
        self._interval: float | None = None
        pid = env.get("WATCHDOG_PID")
        if pid is None or pid == str(os.getpid()):
            try:
                usec = int(env.get("WATCHDOG_USEC", ""))
            except ValueError:
                usec = 0
            if usec > 0:
                self._interval = usec / 2 / 1e6

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), None without a watchdog."""
        return self._interval

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1" if status is None else f"READY=1\nSTATUS={_line(status)}")

    def status(self, text: str) -> None:
        self._send(f"STATUS={_line(text)}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def reloading(self) -> None:
        # systemd >= 253 needs MONOTONIC_USEC with RELOADING=1 for Type=notify-reload.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            self._warn(os.strerror(exc.errno) if exc.errno else str(exc))

    def _warn(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "NOTIFY_SOCKET=%s: cannot notify systemd: %s; further failures are not logged",
                self._path,
                reason,
            )


def _line(text: str) -> str:
    """A STATUS= value is one line: a newline would start a new (bogus) assignment."""
    return " ".join(text.splitlines())
