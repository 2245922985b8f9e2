"""Durations (`500ms`, `30s`, `20m`, `1h`, `2d`) and sizes (`512MiB`, `4GiB`): one parser for both.

Owns: the text forms of time spans and byte counts used by spec files and the config, and
the regular expressions that say the same in a JSON Schema (ECMA-262 syntax: only ASCII
digits, no `\\d`, no `\\s`), including bounds on the value (`every` at least 1s) written as
patterns over the digits. Not here: where those values are allowed (chute.spec, chute.config).
Diagnostics: a unit is required; a bare number (`30`, quoted or not) is a ValueError that
says which unit to add. Values are computed exactly (no float rounding, no overflow), so a
bound checked here and the same bound as a pattern agree on every input.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction

NUMBER = r"[0-9]+(?:\.[0-9]+)?"
"""A number as durations and sizes write it: ASCII digits, an optional fraction, no sign."""

DURATION_UNITS = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}
SIZE_UNITS = {
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
_DURATION = re.compile(rf"^ *({NUMBER}) *(ms|s|m|h|d) *$")
_SIZE = re.compile(rf"^ *({NUMBER}) *({'|'.join(SIZE_UNITS)}) *$")
_BARE = re.compile(rf"^ *({NUMBER}) *$")
DURATION_PATTERN = _DURATION.pattern
SIZE_PATTERN = _SIZE.pattern

DURATION_HINT = "a duration like 500ms, 30s, 20m, 1h or 2d"
SIZE_HINT = "a size like 512MiB or 4GiB"


def no_unit(shown: str, number: str, kind: str) -> str:
    """The message for a number without its unit: `30 has no unit; expected ... (30s for
    seconds)`. `kind` is "duration" or "size"; `shown` is the value as the message shows it."""
    if kind == "duration":
        return f"{shown} has no unit; expected {DURATION_HINT} ({number}s for seconds)"
    return f"{shown} has no unit; expected {SIZE_HINT} ({number}B for bytes)"


def duration_seconds(text: str) -> Fraction:
    """The exact seconds in `text`; ValueError names the accepted forms."""
    m = _DURATION.fullmatch(text)  # fullmatch: `$` alone would let a trailing newline in
    if not m:
        bare = _BARE.fullmatch(text)
        if bare:
            raise ValueError(no_unit(repr(text), bare.group(1), "duration"))
        raise ValueError(f"{text!r} is not {DURATION_HINT}")
    return Fraction(Decimal(m.group(1))) * DURATION_UNITS[m.group(2)]


def parse_duration(text: str) -> float:
    """Seconds in `text`; ValueError names the accepted forms."""
    seconds = duration_seconds(text)
    try:
        return float(seconds)
    except OverflowError:
        raise ValueError(f"{_short(text)!r} is too long to count in seconds") from None


def parse_size(text: str) -> int:
    """Bytes in `text` (a unit is required; a fraction of a byte is dropped); ValueError
    names the accepted forms."""
    m = _SIZE.fullmatch(text)
    if not m:
        bare = _BARE.fullmatch(text)
        if bare:
            raise ValueError(no_unit(repr(text), bare.group(1), "size"))
        raise ValueError(f"{text!r} is not {SIZE_HINT}")
    return int(Fraction(Decimal(m.group(1))) * SIZE_UNITS[m.group(2)])


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


# --- bounds as patterns ------------------------------------------------------------------


def duration_pattern(number: Callable[[Fraction], str]) -> str:
    """A duration whose number, for each unit, matches `number(seconds per unit)`."""
    units = sorted(DURATION_UNITS, key=len, reverse=True)
    either = "|".join(f"(?:{number(DURATION_UNITS[u])}) *{u}" for u in units)
    return f"^ *(?:{either}) *$"


def decimal_at_least(bound: Fraction, *, strict: bool = False) -> str:
    """A pattern for the numbers of NUMBER's form that are >= `bound` (> with `strict`).

    The number is its integer part and its fraction's digits; the bound's fraction is a
    decimal that ends or repeats (1/60 = 0.01666...), so "greater" is a choice at one digit
    after an equal prefix, and a repeating tail is a starred group.
    """
    if bound < 0:
        raise ValueError("bound must be >= 0")
    whole = bound.numerator // bound.denominator
    rest = bound - whole
    prefix, period = _expansion(rest)
    higher = [f"0*(?:{_int_over(whole)})(?:\\.[0-9]+)?"]
    # Integer part equal to the bound's: the fraction decides.
    equal = "0*" + str(whole) if whole else "0+"
    over: list[str] = []
    for i, digit in enumerate(prefix):
        if digit != "9":
            over.append(f"{prefix[:i]}[{int(digit) + 1}-9][0-9]*")
    for i, digit in enumerate(period):
        if digit != "9":
            over.append(f"{prefix}(?:{period})*{period[:i]}[{int(digit) + 1}-9][0-9]*")
    fractions = list(over)
    if period == "0" and not strict:  # the bound is a finite decimal: the number may equal it
        fractions.append(f"{prefix}0*" if prefix else "0+")
    if fractions:
        tail = f"\\.(?:{'|'.join(fractions)})"
        higher.append(f"{equal}(?:{tail})" if rest or strict else f"{equal}(?:{tail})?")
    return "|".join(higher)


def decimal_at_most(bound: int) -> str:
    """A pattern for the numbers of NUMBER's form that are <= the whole number `bound`."""
    if bound < 0:
        raise ValueError("bound must be >= 0")
    text = str(bound)
    under: list[str] = ["0+"] if bound else []
    if len(text) > 1:
        under.append(f"0*[1-9][0-9]{{0,{len(text) - 2}}}")
    for i, digit in enumerate(text):
        low = 1 if i == 0 else 0
        if int(digit) > low:
            rest = len(text) - i - 1
            under.append(f"0*{text[:i]}[{low}-{int(digit) - 1}][0-9]{{{rest}}}")
    parts = [f"(?:{'|'.join(under)})(?:\\.[0-9]+)?"] if under else []
    parts.append(f"{'0*' + text if bound else '0+'}(?:\\.0+)?")
    return "|".join(parts)


def _int_over(n: int) -> str:
    """Whole numbers > n, written without leading zeros."""
    text = str(n)
    longer = f"[1-9][0-9]{{{len(text)},}}"
    same: list[str] = []
    for i, digit in enumerate(text):
        if digit != "9":
            rest = len(text) - i - 1
            same.append(f"{text[:i]}[{int(digit) + 1}-9][0-9]{{{rest}}}")
    return "|".join([longer, *same])


def _expansion(fraction: Fraction) -> tuple[str, str]:
    """The decimal digits of 0 <= fraction < 1 as (prefix, period): 1/60 is ("01", "6"),
    1/4 is ("25", "0"), 0 is ("", "0")."""
    digits: list[str] = []
    seen: dict[int, int] = {}
    remainder = fraction.numerator
    while remainder not in seen:
        seen[remainder] = len(digits)
        remainder *= 10
        digits.append(str(remainder // fraction.denominator))
        remainder %= fraction.denominator
    start = seen[remainder]
    return "".join(digits[:start]), "".join(digits[start:])


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
            if n.bit_length() > 1000:  # past a float's range (a spec may ask for 10**400 B)
                return f"{Decimal(n) / factor:.3g}{unit}"
            text = f"{n / factor:.3g}"
            return f"{text if '.' in text else f'{n / factor:.2f}'}{unit}"
    return f"{n}B"
