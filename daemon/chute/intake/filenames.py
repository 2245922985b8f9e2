"""The names of dropped files: which intake takes, how a claim is named, and a file's identity.

Owns: the candidate rule (hidden, temp and partial names wait in incoming/), the spec
suffixes, a claim's name in state/intake/ (`<run_id>__<name>`), the identity of a dropped
file (file_id), and a name as one log line shows it, as JSON carries it, and cut to fit
NAME_MAX beside a prefix or suffix. Not here: names from outside that name runs, schedules
and stages (chute.names), what a file holds (chute.intake.inspection).
Crash safety: pure; no I/O.
"""

from __future__ import annotations

import os

from chute.names import is_run_id

CLAIM_SEP = "__"
IGNORED_SUFFIXES = (".tmp", ".part", ".swp")
SPEC_SUFFIXES = (".yaml", ".yml")
NAME_MAX = 255
NOT_YAML = (
    "is not named *.yaml or *.yml; chute takes spec files with those suffixes (any case) — "
    "rename it, or write it under a dot-name or with .tmp/.part/.swp until it is complete"
)


def is_candidate(name: str) -> bool:
    """A name intake takes: anything not hidden and not a temp or partial file (a name
    without a spec suffix is taken too, and rejected: see is_spec_name)."""
    return not (name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES))


def is_spec_name(name: str) -> bool:
    """`*.yaml` or `*.yml`, in any case: the names a spec may be dropped under."""
    return name.lower().endswith(SPEC_SUFFIXES)


def file_id(st: os.stat_result) -> str:
    """`<st_dev>:<st_ino>`: which file was dropped, as run.json's trigger.file_id, an
    error.json's file_id and a schedule's owner record carry it. `chute submit` knows it of
    the file it placed (a rename keeps the inode), and holds the file open until it has found
    its outcome, so no other file can have that identity meanwhile (chute.intake.submission)."""
    return f"{st.st_dev}:{st.st_ino}"


def claim_name(run_id: str, name: str) -> str:
    """The name in state/intake/ of incoming/<name> claimed for run `run_id`."""
    prefix = run_id + CLAIM_SEP
    return prefix + fit(name, len(prefix))


def claimed_as(entry: str) -> tuple[str, str] | None:
    """(run id, name as dropped) of a claim's name; None for a name intake never gives one."""
    run_id, sep, name = entry.partition(CLAIM_SEP)
    if not sep or not is_run_id(run_id) or not name:
        return None
    return run_id, name


def fit(name: str, extra: int) -> str:
    """`name`, cut so that `extra` more bytes still fit in a file name (NAME_MAX)."""
    raw = os.fsencode(name)
    if len(raw) + extra <= NAME_MAX:
        return name
    return os.fsdecode(raw[: NAME_MAX - extra])


def json_safe(name: str) -> str:
    """A file name as valid UTF-8 (undecodable bytes become U+FFFD) for JSON."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def show(text: str) -> str:
    """Text for one log line: control characters (a newline in a file name) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in json_safe(text))
