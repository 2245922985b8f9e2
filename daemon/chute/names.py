"""The forms of the names that arrive from outside: run ids, run references, schedule,
pipeline and stage names.

Owns: what each kind of name looks like, checked before the name touches the filesystem,
and the messages that say so. Not here: whether the thing named exists (chute.store.rundir,
the callers), how run ids are made (chute.store.rundir.new_run_id, Fire.run_id).
Why: a name from a CLI argument, a control file or an HTTP path is joined to a folder of
the spool, and `folder / name` is not a check: `../queue/<id>`, `/etc` and `..` all join.
A name of its kind's form is one path component that cannot leave its folder.
Diagnostics: BadName carries one line that says what was given and what the form is.
"""

from __future__ import annotations

import re

RUN_ID_PATTERN = r"\d{8}_\d{6}_[0-9a-f]{6}"
"""`20261122_101500_a1b2c3`: what rundir.new_run_id and Fire.run_id make."""
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,62}"
"""metadata.name (a pipeline, a schedule: schedules/<name>.yaml) and a stage's name."""
NAME_HINT = (
    "a name of lowercase letters, digits, '.', '_' or '-' (starting with a letter or digit, "
    "at most 63), like nightly-etl"
)
RUN_REF_HINT = (
    "give a run id (like 20261122_101500_a1b2c3), a prefix of one, latest, or <pipeline>/latest"
)

_RUN_ID = re.compile(RUN_ID_PATTERN)
_NAME = re.compile(NAME_PATTERN)
# A prefix of a run id: the date's digits, then the time's, then the suffix's hex digits.
_RUN_ID_PREFIX = re.compile(r"\d{1,7}|\d{8}(_(\d{0,5}|\d{6}(_[0-9a-f]{0,6})?))?")


class BadName(ValueError):
    """A name not of its kind's form; str() is the one-line message."""


def is_run_id(text: object) -> bool:
    return isinstance(text, str) and _RUN_ID.fullmatch(text) is not None


def is_name(text: object) -> bool:
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


def run_id(text: object, what: str = "run id") -> str:
    """`text` if it is a run id; else BadName."""
    if not is_run_id(text):
        raise BadName(f"{_show(text)}: not a {what}; a run id looks like 20261122_101500_a1b2c3")
    assert isinstance(text, str)
    return text


def name(text: object, what: str) -> str:
    """`text` if it is a schedule, pipeline or stage name (`what` says which); else BadName."""
    if not is_name(text):
        raise BadName(f"{_show(text)}: not a {what}; {NAME_HINT}")
    assert isinstance(text, str)
    return text


def run_ref(text: str) -> str:
    """`text` if it can name a run: a run id, a prefix of one, `latest` or
    `<pipeline>/latest`; else BadName."""
    if text == "latest" or _RUN_ID_PREFIX.fullmatch(text):
        return text
    pipeline, sep, last = text.partition("/")
    if sep and last == "latest" and is_name(pipeline):
        return text
    raise BadName(f"{_show(text)}: not a run; {RUN_REF_HINT}")


def _show(text: object) -> str:
    """A name for one message line: quoted when it is not plain printable text."""
    if isinstance(text, str) and text and text.isprintable() and text.strip() == text:
        return text
    return repr(text)
