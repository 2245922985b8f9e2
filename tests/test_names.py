"""The forms of names from outside: what passes, and the message for what does not."""

from __future__ import annotations

import pytest

from chute import names

HOSTILE = ["..", ".", "", "../queue/20261122_101500_a1b2c3", "/etc", "a/b", "a\nb", " x", "X"]


@pytest.mark.parametrize("text", ["20261122_101500_a1b2c3", "19990101_000000_000000"])
def test_a_run_id_passes(text: str) -> None:
    assert names.run_id(text) == text


@pytest.mark.parametrize(
    "text",
    [*HOSTILE, "20261122_101500_A1B2C3", "20261122_101500_a1b2c3/..", 20261122, None],
    ids=lambda t: repr(t),
)
def test_anything_else_is_not_a_run_id(text: object) -> None:
    with pytest.raises(names.BadName, match="not a run id; a run id looks like 20261122_101500"):
        names.run_id(text)


@pytest.mark.parametrize("text", ["nightly-etl", "a", "x.y_z-1", "0" * 63])
def test_a_name_passes(text: str) -> None:
    assert names.name(text, "schedule name") == text


@pytest.mark.parametrize("text", [*HOSTILE, "-dash", "a" * 64, 7], ids=lambda t: repr(t)[:20])
def test_anything_else_is_not_a_name(text: object) -> None:
    with pytest.raises(names.BadName) as caught:
        names.name(text, "schedule name")
    assert ": not a schedule name; a name of lowercase letters, digits," in str(caught.value)


@pytest.mark.parametrize(
    "ref",
    [
        "latest",
        "nightly-etl/latest",
        "20261122_101500_a1b2c3",
        "2026",
        "20261122_",
        "20261122_1015",
    ],
)
def test_run_refs_that_pass(ref: str) -> None:
    assert names.run_ref(ref) == ref


@pytest.mark.parametrize(
    "ref",
    [
        *HOSTILE,
        "../latest",
        "/tmp/x/latest",
        "a/b/latest",
        "Latest",
        "2026x",
        "20261122_101500_a1b2c3d",
    ],
    ids=lambda t: repr(t),
)
def test_run_refs_that_do_not(ref: str) -> None:
    with pytest.raises(names.BadName) as caught:
        names.run_ref(ref)
    assert str(caught.value).endswith(
        ": not a run; give a run id (like 20261122_101500_a1b2c3), a prefix of one, latest, "
        "or <pipeline>/latest"
    )


def test_a_message_shows_a_name_with_odd_characters_quoted() -> None:
    with pytest.raises(names.BadName, match=r"^'a\\nb': not a run id"):
        names.run_id("a\nb")
