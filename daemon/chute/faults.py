"""Named crash points, so fault tests can kill -9 a process at an exact instant.

Owns: the CHUTE_CRASH_AT environment variable. `crash_point("retry.copied")` does nothing
unless the process was started with CHUTE_CRASH_AT naming that point; then the process
sends itself SIGKILL there, as a power cut or `kill -9` would, with no cleanup of any kind.
`NAME:N` crashes at the Nth time the point is reached (default: the first). Several points
may be given, separated by commas; each is counted on its own.

Why in the product and not only under strace: the instants that matter (between two
renames of one handover, after a copy and before its record) are not distinguishable
system calls, and a test that kills "somewhere around" them proves nothing. A point costs
one global check when the variable is unset.
Not here: what is durable at each point (the modules that call crash_point say so).
"""

from __future__ import annotations

import os
import signal

ENV = "CHUTE_CRASH_AT"


def _parse(text: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        points[name] = int(count) if count.isdigit() and int(count) > 0 else 1
    return points


_armed: dict[str, int] | None = _parse(os.environ[ENV]) if os.environ.get(ENV) else None


def crash_point(name: str) -> None:
    """SIGKILL this process here if CHUTE_CRASH_AT names `name` (and this is its Nth time)."""
    if _armed is None or name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
