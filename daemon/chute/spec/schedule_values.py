"""The values that say when a schedule fires: a cron expression, an instant, a time zone.

Owns: the five crontab fields' names as a crontab user knows them and the pattern of each
field's values (numbers in range, month and weekday names in any case, `last`, ranges, steps,
lists); Cron, which checks an expression by those patterns and by APScheduler; DateTime, an
RFC 3339 instant with its UTC offset; TimeZone, an IANA zone name. Not here: when a schedule
fires (chute.scheduling.schedules), durations (chute.spec.scalars), the structures
(chute.spec.types).
Crash safety: pure functions; no I/O.
Limits: a cron range that runs backwards or a step wider than its field, a real calendar
date and a known time zone have no JSON Schema form: the schema accepts them and only the
validator refuses them.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from chute.spec.load import Node
from chute.spec.types import Context, Type, ecma, found, suggest

RFC3339_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]"
    r":[0-5][0-9](\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
CRON_FIELDS = {  # APScheduler's name -> the name a crontab user knows
    "minute": "minute",
    "hour": "hour",
    "day": "day of month",
    "month": "month",
    "day_of_week": "weekday",
}


def _any_case(word: str) -> str:
    return "".join(f"[{c}{c.upper()}]" for c in word)


def _cron_field(
    number: str, names: Sequence[str] = (), *, named_steps: bool = True, word: str = ""
) -> str:
    """A pattern for one cron field: items `*`, `a`, `a-b`, each with an optional `/step`,
    joined by commas; `a` a number in the field's range or (any case) one of `names`; `word`
    an item of its own (`last`)."""
    numbered = f"(?:\\*|{number}(?:-{number})?)(?:/[0-9]+)?"
    items = [numbered]
    if names:
        named = f"(?:{'|'.join(_any_case(n) for n in names)})"
        step = "(?:/[0-9]+)?" if named_steps else ""  # APScheduler drops a step after a month
        items.append(f"{named}(?:-{named})?{step}")
    if word:
        items.append(_any_case(word))
    item = f"(?:{'|'.join(items)})"
    return f"{item}(?:,{item})*"


_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
CRON_FIELD_PATTERNS = {  # leading zeros are allowed, as cron and APScheduler allow them
    "minute": _cron_field("0*[1-5]?[0-9]"),
    "hour": _cron_field("0*(?:1?[0-9]|2[0-3])"),
    "day": _cron_field("0*(?:[1-9]|[12][0-9]|3[01])", word="last"),
    "month": _cron_field("0*(?:[1-9]|1[0-2])", _MONTH_NAMES, named_steps=False),
    "day_of_week": _cron_field("0*[0-7]", _DAY_NAMES),
}
CRON_FIELD_HINTS = {
    "minute": "0-59",
    "hour": "0-23",
    "day": "1-31 or last",
    "month": "1-12 or jan-dec (a step only with numbers)",
    "day_of_week": "0-7 (0 and 7 are Sunday) or sun-sat",
}
CRON_PATTERN = (
    "^[ \\t]*" + "[ \\t]+".join(f"(?:{p})" for p in CRON_FIELD_PATTERNS.values()) + "[ \\t]*$"
)


class Cron(Type):
    """Five crontab fields. The schema's pattern holds each field's values; APScheduler (and
    chute.scheduling.cron for weekdays) also checks what a pattern cannot: a range's order and
    a step wider than the field."""

    hint = "5 fields: minute hour day month weekday, like '0 2 * * *'"

    def check(self, node: Node, path: str, cx: Context) -> Any:
        if not node.is_scalar or not isinstance(node.value, str):
            return self.wrong(node, path, cx)
        from apscheduler.triggers.cron import CronTrigger  # slow import; only for cron specs

        stripped = node.value.strip(" \t")
        parts = re.split(r"[ \t]+", stripped) if stripped else []
        if len(parts) != 5:
            return cx.report(
                node.line, path, f"{node.value!r} has {len(parts)} fields; expected {self.hint}"
            )
        from chute.scheduling.cron import (
            crontab_weekdays,  # crontab numbering: 0 and 7 are Sunday
        )

        bad: list[str] = []
        for (name, label), part in zip(CRON_FIELDS.items(), parts, strict=True):
            try:
                value = crontab_weekdays(part) if name == "day_of_week" else part
                CronTrigger(**{name: value}, timezone="UTC")
            except (ValueError, TypeError) as e:
                reason = re.sub(r"^Error validating expression '.*?': ", "", str(e))
                bad.append(f"{label} field {part!r}: {reason}")
                continue
            if not re.fullmatch(CRON_FIELD_PATTERNS[name], part):  # `jan5`, `last/2`, `٣`
                hint = CRON_FIELD_HINTS[name]
                bad.append(
                    f"{label} field {part!r}: expected {hint}, *, a range a-b, a step /n "
                    "or a list of them"
                )
        if bad:
            return cx.report(node.line, path, f"{node.value!r}: " + "; ".join(bad))
        return " ".join(parts)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "pattern": CRON_PATTERN}


class DateTime(Type):
    """An instant in RFC 3339 with its UTC offset; YAML may hand us a datetime already."""

    hint = "a date and time with its UTC offset, like 2026-12-01T02:00:00+08:00"
    regex = ecma(RFC3339_PATTERN)

    def check(self, node: Node, path: str, cx: Context) -> Any:
        if not node.is_scalar or isinstance(node.value, bool | int | float) or node.value is None:
            return self.wrong(node, path, cx)
        text = node.text or ""
        # fromisoformat (3.11) takes Z but not RFC 3339's lower-case z
        iso = text[:-1] + "Z" if text.endswith("z") else text
        if self.regex.search(text):
            try:
                return datetime.fromisoformat(iso)
            except ValueError as e:  # 2026-02-30
                return cx.report(node.line, path, f"{text} is not a real date and time ({e})")
        shape = re.fullmatch(
            r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?(.*)", text
        )
        if shape and not shape.group(3):
            return cx.report(
                node.line, path, f"{text} has no UTC offset; add one, like {text}+00:00"
            )
        if shape:
            try:
                datetime.fromisoformat(iso)
            except ValueError as e:  # 2026-13-01
                return cx.report(node.line, path, f"{text} is not a real date and time ({e})")
        return cx.report(node.line, path, f"{found(node)}; expected {self.hint}")

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "pattern": RFC3339_PATTERN}


class TimeZone(Type):
    hint = "an IANA time zone name like UTC or Asia/Shanghai"

    def check(self, node: Node, path: str, cx: Context) -> Any:
        if not node.is_scalar or not isinstance(node.value, str):
            return self.wrong(node, path, cx)
        name = node.value
        try:
            zoneinfo.ZoneInfo(name)
            return name
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            pass
        message = f"{name!r} is not a known time zone; expected {self.hint}"
        close = suggest(name, sorted(zoneinfo.available_timezones()))
        if close:
            message += f" (did you mean {close!r}?)"
        return cx.report(node.line, path, message)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "minLength": 1}
