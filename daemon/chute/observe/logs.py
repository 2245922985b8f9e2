"""Log lines: one per event on stderr, journald-friendly.

Owns: the logging setup of every chute command. Under systemd ($JOURNAL_STREAM set) lines
carry no timestamp and start with the sd-daemon level prefix (<3> error, <4> warning,
<6> info, <7> debug) so `journalctl -p` filters; `log_format: json` prints JSON lines, with
the time in milliseconds (UTC) and, for a line about a run or stage, `run_id`, `stage` and
`state` as fields: a call's `extra=` gives them, else they are read from the line as every
chute line is written (the run id first, or `run <id>`; `stage <name>`; `state=<state>`).
The daemon's loop holds its INFO and DEBUG lines and writes them in one go before each wait
(hold/write_held): a burst of runs logs three lines per run, and a write(2) of each from the
loop was a wait for the GIL each. A line is thus late by at most one turn of the loop;
other threads' lines, and warnings and errors, are written at once.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import TextIO

import orjson

from chute.clock import rfc3339
from chute.names import NAME_PATTERN, RUN_ID_PATTERN

_SD_LEVEL = {
    logging.CRITICAL: "<2>",
    logging.ERROR: "<3>",
    logging.WARNING: "<4>",
    logging.INFO: "<6>",
    logging.DEBUG: "<7>",
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = _SD_LEVEL.get(record.levelno, "<6>")
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines())


# What a line is about, as chute writes its lines: the subject first, then key=value.
_FIELDS = {
    "run_id": re.compile(rf"^({RUN_ID_PATTERN})\b|\brun ({RUN_ID_PATTERN})\b"),
    "stage": re.compile(rf"\bstage ({NAME_PATTERN})(?![a-z0-9._-])"),
    "state": re.compile(r"\bstate=([a-z_]+)"),
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, object] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for field, pattern in _FIELDS.items():
            given = getattr(record, field, None)
            if given is not None:
                doc[field] = given
            elif found := pattern.search(message):
                doc[field] = found.group(found.lastindex or 1)
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class _Handler(logging.StreamHandler[TextIO]):
    """A StreamHandler that can hold the INFO and DEBUG lines of one thread."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.holder: int | None = None  # the thread whose lines are held
        self._held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.holder is None or self.holder != threading.get_ident():
            super().emit(record)
            return
        try:
            self._held.append(self.format(record) + self.terminator)
        except Exception:  # noqa: BLE001 - logging's policy: handleError reports it
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self._write_held(record)

    def write_held(self) -> None:
        if self._held:
            with self.lock or _NO_LOCK:
                self._write_held(None)

    def _write_held(self, record: logging.LogRecord | None) -> None:
        text, self._held = "".join(self._held), []
        try:
            self.stream.write(text)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's policy: handleError reports it
            self.handleError(record or logging.makeLogRecord({"msg": text}))


_NO_LOCK = threading.Lock()


def _handler() -> _Handler | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, _Handler)), None)


def hold() -> None:
    """Hold the calling thread's INFO and DEBUG lines until write_held() (or unhold())."""
    handler = _handler()
    if handler is not None:
        handler.holder = threading.get_ident()


def write_held() -> None:
    """Write the held lines, in one write(2); call it before the holding thread waits."""
    handler = _handler()
    if handler is not None:
        handler.write_held()


def unhold() -> None:
    handler = _handler()
    if handler is not None:
        handler.write_held()
        handler.holder = None


def setup(level: int = logging.INFO, fmt: str = "text") -> None:
    handler = _Handler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    elif os.environ.get("JOURNAL_STREAM"):
        formatter = JournalFormatter("%(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Handler):  # a reload: the holding thread keeps holding
            h.write_held()
            handler.holder = h.holder
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
