"""Log lines: one per event on stderr, journald-friendly.

Owns: the logging setup of every chute command. Under systemd ($JOURNAL_STREAM set) lines
carry no timestamp and start with the sd-daemon level prefix (<3> error, <4> warning,
<6> info, <7> debug) so `journalctl -p` filters; `log_format: json` prints JSON lines.
"""

from __future__ import annotations

import logging
import os
import sys

import orjson

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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup(level: int = logging.INFO, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
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
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
