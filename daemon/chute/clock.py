"""The one clock of the shell: wall time for records, monotonic time for deadlines.

Owns: reading time. Pure code takes `now` as an argument instead; tests replace this.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


class Clock:
    """Real time. Tests substitute a subclass with manual time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


def rfc3339(ts: float | datetime) -> str:
    """`2026-11-22T10:15:00.123Z` for a UTC timestamp."""
    dt = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
