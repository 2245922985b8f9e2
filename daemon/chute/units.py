"""Durations (`500ms`, `30s`, `20m`, `1h`, `2d`) and sizes (`512MiB`, `4GiB`): one parser for both.

Owns: the text forms of time spans and byte counts used by spec files and the config.
Not here: where those values are allowed (chute.spec, chute.config).
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}

DURATION_HINT = "a duration like 500ms, 30s, 20m, 1h or 2d"
SIZE_HINT = "a size like 512MiB or 4GiB"


def parse_duration(text: str) -> float:
    """Seconds in `text`; ValueError names the accepted forms."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not {DURATION_HINT}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """Bytes in `text` (a bare number is bytes); ValueError names the accepted forms."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not {SIZE_HINT}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def format_duration(seconds: float) -> str:
    """Short human form for tables: 0.42s, 3.2s, 4m05s, 2h03m, 30d, 2d04h."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d" if hours == minutes == secs == 0 else f"{days}d{hours:02d}h"


def format_size(n: int) -> str:
    """A size as people read it: the biggest unit that fits, exact when it divides (`4GiB`,
    `64MiB`), else three significant digits (`23.5GiB`, `3.00KiB`); under 1 KiB in bytes."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            if n % factor == 0:
                return f"{n // factor}{unit}"
            text = f"{n / factor:.3g}"
            return f"{text if '.' in text else f'{n / factor:.2f}'}{unit}"
    return f"{n}B"
