"""Sizes and durations as users read them in chute's messages and tables."""

from __future__ import annotations

import pytest

from chute.units import format_duration, format_size


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
