"""Durations (`500ms`, `30s`, `20m`, `90min`, `1h30m`, `2w`) and sizes (`512MiB`, `4GiB`): one
parser for both.

Owns: the text forms of time spans and byte counts used by spec files and the config, and
the regular expressions that say the same in a JSON Schema (ECMA-262 syntax: only ASCII
digits, no `\\d`, no `\\s`), including bounds on the value (`every` at least 1s) written as
patterns over the digits. Not here: where those values are allowed (chute.spec, chute.config).
A duration is one number and its unit (`1.5h`, `30 s`), or a compound as Go and systemd
users write it: whole numbers, no spaces, units from the largest down, each once, each part
after the first less than one of the unit before it (`1h30m`, `1d12h`, `2m30s500ms`), so
that a bound is a pattern too.
Diagnostics: a unit is required; a bare number (`30`, quoted or not) is a ValueError that
says which unit to add; a compound that breaks its rules gets them all. Values are computed
exactly (no float rounding, no overflow), so a bound checked here and the same bound as a
pattern agree on every input.
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
    "min": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
    "w": Fraction(7 * 86400),
}
# A compound's places, largest first: (the unit as a pattern, its seconds).
_PLACES = [
    ("w", Fraction(7 * 86400)),
    ("d", Fraction(86400)),
    ("h", Fraction(3600)),
    ("(?:min|m)", Fraction(60)),
    ("s", Fraction(1)),
    ("ms", Fraction(1, 1000)),
]
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
_UNIT = "ms|min|s|m|h|d|w"  # ms and min before m: the first that fits is taken
_DURATION = re.compile(rf"^ *({NUMBER}) *({_UNIT}) *$")
_PART = re.compile(rf"({NUMBER}) *({_UNIT})")
_PARTS = re.compile(rf"^ *(?:{NUMBER} *(?:{_UNIT}) *)+$")  # what may be meant as a compound
_SIZE = re.compile(rf"^ *({NUMBER}) *({'|'.join(SIZE_UNITS)}) *$")
_BARE = re.compile(rf"^ *({NUMBER}) *$")
SIZE_PATTERN = _SIZE.pattern

DURATION_HINT = "a duration like 500ms, 30s, 20m, 1h or 2d"
COMPOUND_RULE = (
    "a compound duration has whole numbers, no spaces, units from the largest down (w, d, h, "
    "m or min, s, ms), each once, and each part after the first less than one of the unit "
    "before it, like 1h30m or 1d12h"
)
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
    if m:
        return Fraction(Decimal(m.group(1))) * DURATION_UNITS[m.group(2)]
    if _COMPOUND.fullmatch(text):
        return sum(
            (Fraction(int(n)) * DURATION_UNITS[u] for n, u in _PART.findall(text)), Fraction(0)
        )
    bare = _BARE.fullmatch(text)
    if bare:
        raise ValueError(no_unit(repr(text), bare.group(1), "duration"))
    if _PARTS.fullmatch(text):
        raise ValueError(f"{_short(text)!r} is not {DURATION_HINT}: {COMPOUND_RULE}")
    raise ValueError(f"{text!r} is not {DURATION_HINT}")


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
    """A duration of one number and its unit whose number, for each unit, matches
    `number(seconds per unit)`."""
    units = sorted(DURATION_UNITS, key=len, reverse=True)
    either = "|".join(f"(?:{number(DURATION_UNITS[u])}) *{u}" for u in units)
    return f"^ *(?:{either}) *$"


def _below(n: int) -> str:
    """Whole numbers < n (n >= 1), leading zeros allowed."""
    return "|".join(_whole_under(n))


def _rest(i: int) -> str:
    """A compound's parts after place i: each optional, each under the place before it."""
    return "".join(
        f"(?:(?:{_below(int(_PLACES[j - 1][1] / _PLACES[j][1]))}){_PLACES[j][0]})?"
        for j in range(i + 1, len(_PLACES))
    )


def _compound(first: Callable[[int], str]) -> str:
    """Compounds (as pattern text, no anchors): for each place i a compound may start at,
    `first(i)` is the pattern of the compound that starts there ("" for none)."""
    return "|".join(p for p in (first(i) for i in range(len(_PLACES) - 1)) if p)


def duration_at_most(limit: Fraction) -> str:
    """The durations, of one unit or compound, of at most `limit` seconds."""

    def first(i: int) -> str:
        unit, seconds = _PLACES[i]
        whole = int(limit // seconds)
        left = int((limit - whole * seconds) * 1000)  # in ms: the smallest place
        digits = []
        for _, place in _PLACES[i + 1 :]:
            digits.append(int(left // (place * 1000)))
            left -= digits[-1] * int(place * 1000)
        under = f"(?:{_below(whole)}){unit}{_rest(i)}" if whole else ""
        equal = f"{'0*' + str(whole) if whole else '0+'}{unit}{_at_most(i + 1, digits)}"
        return f"{under}|{equal}" if under else equal

    single = duration_pattern(lambda unit: decimal_at_most(limit / unit))
    return f"^ *(?:{_core(single)}|{_compound(first)}) *$"


def _at_most(i: int, digits: list[int]) -> str:
    """The parts after place i - 1 whose value, read as digits, is at most `digits`."""
    if not digits:
        return ""
    unit = _PLACES[i][0]
    if digits[0] == 0:
        return f"(?:0+{unit})?{_at_most(i + 1, digits[1:])}"
    return (
        f"(?:(?:(?:{_below(digits[0])}){unit})?{_rest(i)}"
        f"|0*{digits[0]}{unit}{_at_most(i + 1, digits[1:])})"
    )


def duration_at_least(bound: Fraction, *, strict: bool = False) -> str:
    """The durations, of one unit or compound, of at least `bound` seconds (more, with
    `strict`). A compound's parts are whole and each is under the place before it, so one
    part alone reaches a bound of at most 1s whenever the sum does (and the milliseconds
    part, under 1000, reaches only a bound of at most 1ms)."""
    if bound > 1 or (Fraction(1, 1000) < bound < 1) or (bound == 0 and not strict):
        raise ValueError("a compound's lower bound is a pattern only for 0 (strict), <=1ms or 1s")

    def reaches(i: int) -> str:
        """Whole numbers in place i (i > 0: under the place before it) that reach the bound."""
        seconds = _PLACES[i][1]
        if seconds * 1 < bound or (i == len(_PLACES) - 1 and bound >= 1):
            return ""
        nonzero = "0*[1-9][0-9]*"
        if i == 0:
            return nonzero
        return "|".join(p for p in _whole_under(int(_PLACES[i - 1][1] / seconds)) if p != "0+")

    def some(i: int) -> str:
        """Parts from place i on, one of which reaches the bound."""
        if i == len(_PLACES):
            return ""
        unit, here = _PLACES[i][0], reaches(i)
        options = [f"(?:{here}){unit}{_rest(i)}"] if here else []
        later = some(i + 1)
        if later:
            options.append(f"(?:0+{unit})?{later}")
        return f"(?:{'|'.join(options)})" if options else ""

    def first(i: int) -> str:
        unit = _PLACES[i][0]
        options = [f"(?:0*[1-9][0-9]*){unit}{_rest(i)}"] if _PLACES[i][1] >= bound else []
        later = some(i + 1)
        if later:
            options.append(f"0+{unit}{later}")
        return "|".join(options)

    single = duration_pattern(lambda unit: decimal_at_least(bound / unit, strict=strict))
    return f"^ *(?:{_core(single)}|{_compound(first)}) *$"


def _core(pattern: str) -> str:
    """A whole-text pattern (`^ *...` to `... *$`) without its anchors and spaces."""
    if not (pattern.startswith("^ *") and pattern.endswith(" *$")):
        raise ValueError(f"not a whole-text pattern: {pattern[:40]}")
    return pattern[3:-3]


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


def decimal_at_most(bound: Fraction | int) -> str:
    """A pattern for the numbers of NUMBER's form that are <= `bound`: below its integer
    part, any fraction; equal to it, a fraction that is at most the bound's decimal digits
    (a prefix of them, or smaller at the first digit that differs)."""
    if bound < 0:
        raise ValueError("bound must be >= 0")
    whole = int(bound)  # floor, for bound >= 0
    under = _whole_under(whole)
    parts = [f"(?:{'|'.join(under)})(?:\\.[0-9]+)?"] if under else []
    prefix, period = _expansion(Fraction(bound) - whole)
    fractions = [prefix[:i] for i in range(1, len(prefix) + 1)]
    fractions.append(f"{prefix}(?:{period})*" if prefix else f"(?:{period})+")
    for i, digit in enumerate(prefix):
        if digit != "0":
            fractions.append(f"{prefix[:i]}[0-{int(digit) - 1}][0-9]*")
    for i, digit in enumerate(period):
        if i:
            fractions.append(f"{prefix}(?:{period})*{period[:i]}")
        if digit != "0":
            fractions.append(f"{prefix}(?:{period})*{period[:i]}[0-{int(digit) - 1}][0-9]*")
    parts.append(f"{'0*' + str(whole) if whole else '0+'}(?:\\.(?:{'|'.join(fractions)}))?")
    return "|".join(parts)


def _whole_under(bound: int) -> list[str]:
    """Patterns (alternatives) of the whole numbers < `bound`, leading zeros allowed."""
    text = str(bound)
    under: list[str] = ["0+"] if bound else []
    if len(text) > 1:
        under.append(f"0*[1-9][0-9]{{0,{len(text) - 2}}}")
    for i, digit in enumerate(text):
        low = 1 if i == 0 else 0
        if int(digit) > low:
            rest = len(text) - i - 1
            under.append(f"0*{text[:i]}[{low}-{int(digit) - 1}][0-9]{{{rest}}}")
    return under


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


_COMPOUND = re.compile(f"^ *(?:{_compound(lambda i: f'[0-9]+{_PLACES[i][0]}{_rest(i)}')}) *$")
DURATION_PATTERN = f"^ *(?:{_core(_DURATION.pattern)}|{_core(_COMPOUND.pattern)}) *$"
