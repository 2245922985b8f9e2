"""Sizes and durations: as users write them (a unit, exact values), as chute's messages and
tables print them, and as the JSON Schema's patterns bound them."""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chute.units import (
    DURATION_PATTERN,
    decimal_at_least,
    decimal_at_most,
    duration_at_least,
    duration_at_most,
    duration_pattern,
    duration_seconds,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (80, "80B"),
        (1024, "1KiB"),
        (3073, "3.00KiB"),
        (64 << 20, "64MiB"),
        (24683772 << 10, "23.5GiB"),  # a node's MemTotal, once printed 24683772KiB
        (1000 * 2**20 + 2**19, "1000.50MiB"),
        (4 << 40, "4TiB"),
    ],
)
def test_sizes_print_with_a_human_unit(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.42, "0.42s"),
        (32.5, "32.5s"),
        (245, "4m05s"),
        (7380, "2h03m"),
        (47 * 3600, "47h00m"),
        (30 * 86400, "30d"),  # a configured 30d, once printed 720h00m
        (2 * 86400 + 4 * 3600 + 5, "2d04h"),
    ],
)
def test_durations_print_in_the_largest_sensible_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- parsing: a unit is required, values are exact ----------------------------------------


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (parse_duration, "30", "'30' has no unit; expected a duration like 500ms, 30s, 20m, 1h or "
         "2d (30s for seconds)"),
        (parse_size, "4096", "'4096' has no unit; expected a size like 512MiB or 4GiB (4096B for "
         "bytes)"),
        (parse_duration, "30s\n", "'30s\\n' is not a duration like 500ms, 30s, 20m, 1h or 2d"),
        (parse_duration, "\u0663s", "'\u0663s' is not a duration like 500ms, 30s, 20m, 1h or 2d"),
        (parse_size, "4 gigs", "'4 gigs' is not a size like 512MiB or 4GiB"),
    ],
    ids=["bare-duration", "bare-size", "trailing-newline", "other-digits", "unknown-unit"],
)  # fmt: skip
def test_text_without_a_known_unit_is_refused_with_the_unit_to_add(
    parse: Callable[[str], object], text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=r"^'") as info:
        parse(text)
    assert str(info.value) == message


def test_sizes_and_durations_are_exact_whatever_their_size() -> None:
    assert parse_size("1.5KiB") == 1536
    assert parse_size("9" * 400 + "B") == int("9" * 400)
    assert duration_seconds("0.0166666666666666666667m") > 1
    assert duration_seconds("0.0166666666666666666666m") < 1
    with pytest.raises(ValueError, match="is too long to count in seconds"):
        parse_duration("9" * 400 + "d")


# --- bounds as patterns: the schema's regex says what the exact comparison says -----------

_NUMBERS = st.builds(
    lambda whole, fraction: whole + (f".{fraction}" if fraction else ""),
    st.from_regex(r"0{0,3}[0-9]{1,6}", fullmatch=True),
    st.none() | st.from_regex(r"(0{0,4}1157407|0{0,3}2777|01666|[0-9]){1,3}[0-9]{0,3}",
                              fullmatch=True),
)  # fmt: skip
_BOUNDS = [Fraction(0), Fraction(1), Fraction(1, 60), Fraction(1, 3600), Fraction(1, 86400),
           Fraction(1000), Fraction(5, 4), Fraction(1, 3)]  # fmt: skip


@settings(max_examples=400, deadline=None, database=None)
@given(_NUMBERS)
def test_a_bound_as_a_pattern_matches_exactly_the_numbers_within_it(number: str) -> None:
    value = Fraction(Decimal(number))
    for bound in _BOUNDS:
        assert bool(re.fullmatch(decimal_at_least(bound), number)) == (value >= bound), bound
        strict = decimal_at_least(bound, strict=True)
        assert bool(re.fullmatch(strict, number)) == (value > bound), bound
        assert bool(re.fullmatch(decimal_at_most(bound), number)) == (value <= bound), bound
    for whole in (0, 1, 9, 10, 19, 100, 36_500, 3_153_600_000, Fraction(36_500, 7)):
        assert bool(re.fullmatch(decimal_at_most(whole), number)) == (value <= whole), whole


_LIMIT = Fraction(36_500 * 86_400)
# Parts near each place's edges, so that sums land on both sides of the bounds.
_PART_NUMBERS = st.sampled_from(
    ["0", "00", "1", "01", "2", "6", "7", "23", "24", "59", "60", "999", "1000", "5214", "36499",
     "36500", "876000", "1.5", "0.5"]
)  # fmt: skip
_COMPOUNDS = st.lists(
    st.tuples(_PART_NUMBERS, st.sampled_from(["w", "d", "h", "m", "min", "s", "ms"])),
    min_size=1,
    max_size=4,
).map(lambda parts: "".join(n + u for n, u in parts))


@settings(max_examples=1500, deadline=None, database=None)
@given(_COMPOUNDS)
@pytest.mark.slow
def test_duration_patterns_say_what_the_parser_and_its_bounds_say(text: str) -> None:
    try:
        seconds: Fraction | None = duration_seconds(text)
    except ValueError:
        seconds = None
    assert bool(re.fullmatch(DURATION_PATTERN, text)) == (seconds is not None)
    within = seconds is not None and seconds <= _LIMIT
    assert bool(re.fullmatch(duration_at_most(_LIMIT), text)) == within
    for bound, strict in ((Fraction(1), False), (Fraction(0), True), (Fraction(1, 1000), False)):
        reached = seconds is not None and (seconds > bound if strict else seconds >= bound)
        assert bool(re.fullmatch(duration_at_least(bound, strict=strict), text)) == reached


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h30m", 5400), ("90min", 5400), ("1d12h", 129_600), ("2w", 1_209_600),
     ("1m30s500ms", Fraction(181, 2)), ("0h5m", 300),
     ("1w6d23h59m59s999ms", Fraction("1209599.999"))],
)  # fmt: skip
def test_compound_durations_read_as_go_and_systemd_users_write_them(
    text: str, seconds: int | Fraction
) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize(
    "text", ["2h 30m", "1h90m", "1.5h30m", "30m1h", "1h1h", "1d24h", "1s1000ms"]
)
def test_a_compound_that_breaks_a_rule_is_told_the_rules(text: str) -> None:
    with pytest.raises(ValueError, match=r"^'") as info:
        duration_seconds(text)
    assert str(info.value) == (
        f"{text!r} is not a duration like 500ms, 30s, 20m, 1h or 2d: a compound duration has "
        "whole numbers, no spaces, units from the largest down (w, d, h, m or min, s, ms), each "
        "once, and each part after the first less than one of the unit before it, like 1h30m "
        "or 1d12h"
    )


@pytest.mark.parametrize(
    ("text", "at_least_1s"),
    [("1s", True), ("1000ms", True), ("999.999ms", False), ("0.0167m", True), ("0.0166m", False),
     ("0.0002778h", True), ("0.0002777h", False), ("0.0000116d", True), ("0.0000115d", False),
     ("0s", False), ("01.0s", True)],
)  # fmt: skip
def test_a_duration_pattern_bounds_each_unit_by_its_own_scale(text: str, at_least_1s: bool) -> None:
    pattern = duration_pattern(lambda unit: decimal_at_least(Fraction(1) / unit))
    assert bool(re.fullmatch(pattern, text)) == at_least_1s
    assert (duration_seconds(text) >= 1) == at_least_1s
