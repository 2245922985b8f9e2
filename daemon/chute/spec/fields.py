"""The fields of a spec file, declared once: the validator and the JSON Schema both walk them.

Owns: every field's name, type, description and rule (patterns, ranges, enums, "exactly one
of", "only with"), how a YAML value is checked and converted (durations to seconds, sizes to
bytes, numbers in env to text), and how each rule is written as JSON Schema. Not here: rules
that span fields (stage references, cycles, node limits) and the model (chute.spec.validate,
chute.spec.model); reading YAML (chute.spec.load).
Crash safety: pure functions; no I/O.
Diagnostics: a wrong value adds an Issue `<path>: <what was found>; <the rule or choices>`;
check() then returns INVALID and the caller carries on, so a file's problems come all at once.
Schema and validator agree: every rule the JSON Schema can state is in it (types, enums,
integer ranges, list lengths, patterns for names, durations and sizes with their unit and
bounds, cron's five fields and their values, RFC 3339 instants), and patterns are ECMA-262
as editors run them (ASCII classes; Python searches them as ECMA does, see ecma()). An
integer field takes 2.0 as 2, as JSON Schema does.
Limits: rules with no JSON Schema form are the validator's alone: a cron range that runs
backwards or a step wider than its field, a known time zone, a real calendar date, byte
(not character) sizes of arguments and `NAME=value`, MAX_RUN_TASKS summed over the stages,
non-finite numbers in `with` and `shards.over`, and values YAML 1.1 and YAML 1.2 read
differently (chute.spec.load): an unquoted yes/no/on/off in env, with or shards.over, and
1_000, 0b1010, 1:30 or 017 where a number or a name is expected (a JSON Schema sees the
value one reader made, never how it was written). The schema accepts those and only the
validator refuses. The size limits (MAX_SHARDS, MAX_STAGES, MAX_RUN_TASKS, MAX_RETRIES)
keep one run's memory, manifest and loop work bounded: docs/file-format.md (Limits) gives
the figures they were chosen by.
"""

from __future__ import annotations

import abc
import difflib
import math
import re
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final

from chute import names
from chute.spec.load import BOOLEAN_WORDS, Issue, Node, yaml11_reading
from chute.units import (  # the parser's own patterns, so the schema cannot drift from it
    DURATION_HINT,
    NUMBER,
    SIZE_HINT,
    SIZE_PATTERN,
    decimal_at_least,
    decimal_at_most,
    duration_pattern,
    duration_seconds,
    no_unit,
    parse_size,
)


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()
"""Returned by check() for a value that produced an Issue."""

NAME_PATTERN = f"^{names.NAME_PATTERN}$"
NAME_HINT = names.NAME_HINT
CALL_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
IDENT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_NAME_PATTERN = IDENT_PATTERN
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
INPUT_REF_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
RFC3339_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]"
    r":[0-5][0-9](\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
MAX_SHARDS = 10_000
"""Shards of one stage. A shard is a task the daemon tracks (0.3-1.8 KB of memory while its
run is active) and a manifest entry (~0.7 KB, rewritten while the run runs)."""
MAX_RUN_TASKS = 10_000
"""Tasks of one run: each stage counts 1, a sharded stage its shards (fallbacks aside)."""
MAX_STAGES = 1_000
"""Stages of one pipeline."""
MAX_RETRIES = 100
"""`retries.max`: 101 attempts at most (a manifest lists the first and last few of them)."""
MAX_DURATION_DAYS = 36_500
"""Any duration in a spec: 100 years, far past any real timeout or interval, so that fire
times and deadlines stay within what datetime and the clocks can hold."""
CRON_FIELDS = {  # APScheduler's name -> the name a crontab user knows
    "minute": "minute",
    "hour": "hour",
    "day": "day of month",
    "month": "month",
    "day_of_week": "weekday",
}


@dataclass(slots=True)
class Context:
    """Where issues go while one file is checked."""

    file: str
    issues: list[Issue] = field(default_factory=list)

    def report(self, line: int, path: str, message: str) -> _Invalid:
        self.issues.append(Issue(self.file, line, path, message))
        return INVALID


def _check(kind: Type, node: Node, path: str, cx: Context) -> Any:
    """`kind.check`, but a value that could not be read (chute.spec.load reported it) is
    not reported again as being of the wrong type."""
    return INVALID if node.unread else kind.check(node, path, cx)


def found(node: Node) -> str:
    """What a value is, for messages: `'high' is a string`, `yes is a boolean`, `a list`."""
    if node.is_map:
        return "a mapping"
    if node.is_list:
        return "a list"
    v = node.value
    shown = node.text if node.text is not None else ""
    if len(shown) > 40:
        shown = shown[:37] + "..."
    if v is None:
        return "empty" if not shown or shown == "~" else f"{shown} is null"
    if isinstance(v, bool):
        return f"{shown} is a boolean"
    if isinstance(v, int | float):
        return f"{shown} is a number"
    if isinstance(v, datetime):
        return f"{shown} is a date and time"
    if isinstance(v, date):
        return f"{shown} is a date"
    return f"{shown!r} is a string"


def ecma(pattern: str) -> re.Pattern[str]:
    """`pattern` as a JSON Schema validator runs it (ECMA-262, searched anywhere in the text),
    for `.search`: a final `$` becomes `\\Z`, since Python's `$` also matches before a
    trailing newline and ECMA's does not."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + "\\Z"
    return re.compile(pattern)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _or(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def _suggest(word: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        return lowered.get(word.lower())
    return close[0]


class Type(abc.ABC):
    """A kind of value: checks and converts a Node, and describes itself as JSON Schema."""

    hint = "a value"

    @abc.abstractmethod
    def check(self, node: Node, path: str, cx: Context) -> Any:
        """The value of `node`, or the issue reported through `cx`."""

    @abc.abstractmethod
    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        """This type as JSON Schema (shared definitions go into `defs`)."""

    def wrong(self, node: Node, path: str, cx: Context) -> _Invalid:
        if node.is_scalar and isinstance(node.value, bool) and isinstance(self, Str | Text):
            return cx.report(node.line, path, f'{node.text} is a boolean; quote it ("{node.text}")')
        return cx.report(node.line, path, f"{found(node)}; expected {self.hint}")


def _two_readings(node: Node, old: Any) -> str:
    """`yes is a string in YAML 1.2 but a boolean in YAML 1.1` (old: YAML 1.1's value)."""
    if isinstance(old, bool):
        return f"{node.text} is a string in YAML 1.2 but a boolean in YAML 1.1"
    if isinstance(node.value, str):
        return f"{node.text} is a string in YAML 1.2 but the number {old} in YAML 1.1"
    # both numbers: only a leading 0 does that (octal in YAML 1.1, decimal in YAML 1.2)
    return f"{node.text} is {node.value} in YAML 1.2 but {old} (octal) in YAML 1.1"


def _number_advice(node: Node, old: Any) -> str:
    """What to write for a number the two YAML versions read differently."""
    if isinstance(node.value, str):
        return f"write {old}"
    return f"write {node.value}, or {old} for the octal value"


def _quote(node: Node) -> str:
    return f'quote it ("{node.text}")'


class Str(Type):
    def __init__(self, hint: str = "a string", pattern: str | None = None) -> None:
        self.hint = hint
        self.pattern = pattern
        self.regex = ecma(pattern) if pattern else None

    def check(self, node: Node, path: str, cx: Context) -> Any:
        if not node.is_scalar or not isinstance(node.value, str):
            return self.wrong(node, path, cx)
        old = yaml11_reading(node)
        if old is not None and not isinstance(old, bool):  # 1_000: a number to YAML 1.1
            return cx.report(node.line, path, f"{_two_readings(node, old)}; {_quote(node)}")
        if node.value == "":
            return cx.report(node.line, path, f"is empty; expected {self.hint}")
        if self.regex and not self.regex.search(node.value):
            return cx.report(node.line, path, f"{node.value!r} is not {self.hint}")
        return node.value

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string", "minLength": 1}
        if self.pattern:
            s["pattern"] = self.pattern
        return s


MAX_ARG_BYTES = 131072
"""The kernel's MAX_ARG_STRLEN: the most bytes (with its NUL) one argument or one NAME=value
of a program's environment may hold; past it exec fails with "Argument list too long"."""


class Text(Type):
    """A string; a number is taken as its text as written (`version: 2` is "2").

    `exec_arg`: it becomes one string a program is started with (an argument, or the value
    of `NAME=value` in its environment, NAME being the last part of the path), so it must
    fit MAX_ARG_BYTES."""

    def __init__(
        self, hint: str = "a string", allow_empty: bool = True, exec_arg: str | None = None
    ) -> None:
        self.hint = hint
        self.allow_empty = allow_empty
        self.exec_arg = exec_arg  # None, "argument" or "variable"

    def check(self, node: Node, path: str, cx: Context) -> Any:
        v = node.value
        if not node.is_scalar or isinstance(v, bool) or v is None:
            return self.wrong(node, path, cx)
        assert node.text is not None
        if self.exec_arg == "variable" and node.plain and node.text.lower() in BOOLEAN_WORDS:
            # A task reads its environment as text: `DEBUG: no` must mean one thing to all.
            return cx.report(node.line, path, f"{_two_readings(node, True)}; {_quote(node)}")
        if isinstance(v, int | float):
            return node.text
        if not isinstance(v, str):  # a date: its text; a spec never means a date object here
            return node.text
        if not v and not self.allow_empty:
            return cx.report(node.line, path, f"is empty; expected {self.hint}")
        if self.exec_arg is not None:
            size = len(v.encode()) + 1
            if self.exec_arg == "variable":
                size += len(path.rsplit(".", 1)[-1]) + 1
            if size > MAX_ARG_BYTES:
                what = "NAME=value" if self.exec_arg == "variable" else "one argument"
                return cx.report(
                    node.line,
                    path,
                    f"is {size:,} bytes; the kernel starts no program with {what} over "
                    f"{MAX_ARG_BYTES:,} bytes — put the data in a file and pass its path",
                )
        return v

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        limit = {"maxLength": MAX_ARG_BYTES - 1} if self.exec_arg is not None else {}
        if self.allow_empty and not limit:
            return {"type": ["string", "number"]}
        if self.allow_empty:
            return {"anyOf": [{"type": "string", **limit}, {"type": "number"}]}
        return {"anyOf": [{"type": "string", "minLength": 1, **limit}, {"type": "number"}]}


class Int(Type):
    def __init__(
        self, minimum: int | None = None, maximum: int | None = None, advice: str = ""
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.advice = advice  # what to do instead of going past `maximum`
        if minimum is not None and maximum is not None:
            self.hint = f"an integer from {minimum} to {maximum}"
        elif minimum is not None:
            self.hint = f"an integer ≥ {minimum}"
        else:
            self.hint = "an integer"

    def check(self, node: Node, path: str, cx: Context) -> Any:
        v = node.value
        old = yaml11_reading(node)
        if old is not None and not isinstance(old, bool):  # 1_000, 0b1010, 017
            message = f"{_two_readings(node, old)}; {_number_advice(node, old)}"
            return cx.report(node.line, path, message)
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # JSON has one number type: a JSON Schema integer is 2 or 2.0
        if not node.is_scalar or type(v) is not int:
            return self.wrong(node, path, cx)
        if (self.minimum is not None and v < self.minimum) or (
            self.maximum is not None and v > self.maximum
        ):
            message = f"{v} is out of range; expected {self.hint}"
            if self.advice and self.maximum is not None and v > self.maximum:
                message += f" — {self.advice}"
            return cx.report(node.line, path, message)
        return v

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        return s


class Bool(Type):
    hint = "true or false"

    def check(self, node: Node, path: str, cx: Context) -> Any:
        old = yaml11_reading(node)
        if isinstance(old, bool):
            message = f"{_two_readings(node, old)}; write {str(old).lower()}"
            return cx.report(node.line, path, message)
        if not node.is_scalar or not isinstance(node.value, bool):
            return self.wrong(node, path, cx)
        return node.value

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "boolean"}


class Enum(Type):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.hint = "one of " + ", ".join(choices)

    def check(self, node: Node, path: str, cx: Context) -> Any:
        v = node.value
        if node.is_scalar and isinstance(v, str) and v in self.choices:
            return v
        what = f"{node.text!r} is not a choice" if node.is_scalar and node.text else found(node)
        if len(self.choices) == 1:
            return cx.report(node.line, path, f"{what}; expected {self.choices[0]}")
        message = f"{what}; choose one of {', '.join(self.choices)}"
        if node.is_scalar and node.text:
            close = _suggest(node.text, self.choices)
            if close:
                message += f" (did you mean {close!r}?)"
        return cx.report(node.line, path, message)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"enum": list(self.choices)}


def _number_text(node: Node) -> str:
    """A number as NUMBER writes it (1e3 -> 1000.0), for `(30s for seconds)`."""
    text = node.text or ""
    if re.fullmatch(NUMBER, text):
        return text
    v = node.value
    return format(Decimal(repr(v)), "f") if isinstance(v, float) and math.isfinite(v) else text


class Duration(Type):
    """A span of time, in seconds (float). At most MAX_DURATION_DAYS; `positive`: more than
    0; `minimum`: at least that many seconds. Bounds are checked exactly, as the schema's
    patterns do."""

    def __init__(self, positive: bool = False, minimum: int | None = None) -> None:
        self.positive = positive
        self.minimum = minimum
        self.hint = DURATION_HINT

    def check(self, node: Node, path: str, cx: Context) -> Any:
        v = node.value
        if node.is_scalar and isinstance(v, int | float) and not isinstance(v, bool):
            return cx.report(
                node.line, path, no_unit(str(node.text), _number_text(node), "duration")
            )
        if not node.is_scalar or not isinstance(v, str):
            return self.wrong(node, path, cx)
        try:
            seconds = duration_seconds(v)
        except ValueError as e:
            return cx.report(node.line, path, str(e))
        shown = repr(v) if len(v) <= 40 else repr(v[:37] + "...")
        if self.positive and seconds <= 0:
            return cx.report(node.line, path, f"{shown} is zero; expected a duration more than 0")
        if self.minimum is not None and seconds < self.minimum:
            return cx.report(
                node.line,
                path,
                f"{shown} is under {self.minimum}s; the shortest is {self.minimum}s",
            )
        if seconds > MAX_DURATION_DAYS * 86400:
            return cx.report(
                node.line,
                path,
                f"{shown} is over {MAX_DURATION_DAYS}d (100 years), the longest a duration may be",
            )
        return float(seconds)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        longest = Fraction(MAX_DURATION_DAYS * 86400)

        def at_most(unit: Fraction) -> str:
            return decimal_at_most(int(longest / unit))

        patterns = [duration_pattern(at_most)]
        low: Callable[[Fraction], str] | None = None
        if self.minimum is not None:
            minimum = Fraction(self.minimum)
            low = lambda unit: decimal_at_least(minimum / unit)  # noqa: E731
        elif self.positive:
            low = lambda unit: decimal_at_least(Fraction(0), strict=True)  # noqa: E731
        if low is not None:
            patterns.append(duration_pattern(low))
        if len(patterns) == 1:
            return {"type": "string", "pattern": patterns[0]}
        return {"type": "string", "allOf": [{"pattern": p} for p in patterns]}


class Size(Type):
    hint = SIZE_HINT

    def check(self, node: Node, path: str, cx: Context) -> Any:
        v = node.value
        if node.is_scalar and isinstance(v, int | float) and not isinstance(v, bool):
            return cx.report(node.line, path, no_unit(str(node.text), _number_text(node), "size"))
        if not node.is_scalar or not isinstance(v, str):
            return self.wrong(node, path, cx)
        try:
            return parse_size(v)
        except ValueError as e:
            return cx.report(node.line, path, str(e))

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "pattern": SIZE_PATTERN}


class AbsPath(Str):
    def __init__(self) -> None:
        super().__init__("an absolute path, like /srv/etl", r"^/")


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
        close = _suggest(name, sorted(zoneinfo.available_timezones()))
        if close:
            message += f" (did you mean {close!r}?)"
        return cx.report(node.line, path, message)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "string", "minLength": 1}


class JSONValue(Type):
    """Any plain value, converted to what JSON can carry (dates become their text)."""

    hint = "a plain value (string, number, boolean, null, list or mapping)"

    def check(self, node: Node, path: str, cx: Context) -> Any:
        if node.is_map:
            out: dict[str, Any] = {}
            for key, child in node.value.items():
                v = self.check(child, _join(path, key), cx)
                if v is not INVALID:
                    out[key] = v
            return out
        if node.is_list:
            return [self.check(child, f"{path}[{i}]", cx) for i, child in enumerate(node.value)]
        v = node.value
        old = yaml11_reading(node)
        if old is not None:  # yes, 1_000: what a callable or a shard gets must not depend on
            # the YAML reader
            if isinstance(old, bool):
                advice = f"write {str(old).lower()} for the boolean"
            elif isinstance(v, str):
                advice = f"write {old} for the number"
            else:
                advice = _number_advice(node, old)
            message = f"{_two_readings(node, old)}; {advice}, or {_quote(node)} for the string"
            return cx.report(node.line, path, message)
        if isinstance(v, float) and not math.isfinite(v):
            return cx.report(node.line, path, f"{node.text} is not a finite number; quote it")
        if isinstance(v, date):
            return node.text
        return v

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {}


class Later(Type):
    """A mapping whose fields are checked later, by a rule that needs other fields first."""

    hint = "a mapping"

    def check(self, node: Node, path: str, cx: Context) -> Any:
        return node if node.is_map else self.wrong(node, path, cx)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object"}


class ListOf(Type):
    def __init__(
        self,
        item: Type,
        min_items: int = 1,
        hint: str | None = None,
        *,
        max_items: int | None = None,
        noun: str = "items",
        advice: str = "",
    ) -> None:
        self.item = item
        self.min_items = min_items
        self.hint = hint or f"a list of {item.hint}"
        self.max_items = max_items
        self.noun = noun  # what the items are, for the message past max_items
        self.advice = advice  # what to do instead of going past max_items

    def check(self, node: Node, path: str, cx: Context) -> Any:
        if not node.is_list:
            return self.wrong(node, path, cx)
        if len(node.value) < self.min_items:
            return cx.report(node.line, path, f"is an empty list; expected {self.hint}")
        if self.max_items is not None and len(node.value) > self.max_items:
            # Refused before its items are checked: a list this long is the mistake.
            message = f"has {len(node.value)} {self.noun}; at most {self.max_items}"
            return cx.report(
                node.line, path, message + (f" — {self.advice}" if self.advice else "")
            )
        # INVALID items stay in place, so cross-field rules still see the valid ones by index
        return [_check(self.item, child, f"{path}[{i}]", cx) for i, child in enumerate(node.value)]

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "array", "items": self.item.schema(defs)}
        if self.min_items:
            s["minItems"] = self.min_items
        if self.max_items is not None:
            s["maxItems"] = self.max_items
        return s


class MapOf(Type):
    """A mapping from free keys (matching key_pattern) to values of one type."""

    def __init__(self, value: Type, key_pattern: str, key_hint: str, hint: str) -> None:
        self.value = value
        self.key_pattern = key_pattern
        self.key_regex = ecma(key_pattern)
        self.key_hint = key_hint
        self.hint = hint

    def check(self, node: Node, path: str, cx: Context) -> Any:
        if not node.is_map:
            return self.wrong(node, path, cx)
        out: dict[str, Any] = {}
        ok = True
        for key, child in node.value.items():
            key_path = _join(path, key)
            if not self.key_regex.search(key):
                cx.report(node.key_lines[key], key_path, f"{key!r} is not {self.key_hint}")
                ok = False
                continue
            v = _check(self.value, child, key_path, cx)
            if v is INVALID:
                ok = False
            else:
                out[key] = v
        return out if ok else INVALID

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "propertyNames": {"pattern": self.key_pattern},
            "additionalProperties": self.value.schema(defs),
        }


class Either(Type):
    """One type for a scalar, another for a list, another for a mapping."""

    def __init__(
        self,
        hint: str,
        scalar: Type | None = None,
        list_: Type | None = None,
        map_: Type | None = None,
    ) -> None:
        self.hint = hint
        self.scalar = scalar
        self.list_ = list_
        self.map_ = map_

    def check(self, node: Node, path: str, cx: Context) -> Any:
        t = self.map_ if node.is_map else self.list_ if node.is_list else self.scalar
        if t is None:
            return self.wrong(node, path, cx)
        return _check(t, node, path, cx)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [t.schema(defs) for t in (self.scalar, self.list_, self.map_) if t]}


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: Type
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class OneOf:
    """Exactly one of `names` must be present; `rule` says why, for messages."""

    names: tuple[str, ...]
    rule: str


class Struct(Type):
    """A mapping with named fields: unknown ones are errors, with a suggestion when close."""

    def __init__(
        self,
        name: str,
        description: str,
        fields: Sequence[Field],
        *,
        one_of: Sequence[OneOf] = (),
        only_with: dict[str, tuple[str, str]] | None = None,
        forbidden: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.description = description
        self.fields = {f.name: f for f in fields}
        self.one_of = tuple(one_of)
        self.only_with = only_with or {}  # field -> (the field it needs, message)
        self.forbidden = forbidden or {}  # field -> why it has no meaning here
        shown = [f.name for f in fields if f.required] or [f.name for f in fields]
        self.hint = "a mapping with " + ", ".join(shown)

    def check(self, node: Node, path: str, cx: Context) -> Any:
        if not node.is_map:
            return self.wrong(node, path, cx)
        items: dict[str, Node] = node.value
        out: dict[str, Any] = {}
        for key, child in items.items():
            key_path = _join(path, key)
            key_line = node.key_lines[key]
            if key in self.forbidden:
                cx.report(key_line, key_path, self.forbidden[key])
                continue
            f = self.fields.get(key)
            if f is None:
                names = list(self.fields)
                close = _suggest(key, names)
                listing = ", ".join(names)
                cx.report(
                    key_line,
                    key_path,
                    f"unknown field; did you mean {close!r}? (fields here: {listing})"
                    if close
                    else f"unknown field; fields here: {listing}",
                )
                continue
            value = _check(f.type, child, key_path, cx)
            if value is not INVALID:
                out[key] = value
        for f in self.fields.values():
            if f.required and f.name not in items:
                cx.report(node.line, _join(path, f.name), f"missing; expected {f.type.hint}")
        for group in self.one_of:
            present = [n for n in group.names if n in items]
            where = path or "(top level)"
            if len(present) > 1:
                line = max(node.key_lines[n] for n in present)
                cx.report(line, where, f"has both {' and '.join(present)}; {group.rule}")
            elif not present:
                none = (
                    f"neither {group.names[0]} nor {group.names[1]}"
                    if len(group.names) == 2
                    else f"none of {_or(group.names)}"
                )
                cx.report(node.line, where, f"has {none}; {group.rule}")
        for name, (needs, message) in self.only_with.items():
            if name in items and needs not in items:
                cx.report(node.key_lines[name], _join(path, name), message)
        return out

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        if self.name not in defs:
            defs[self.name] = {}  # placeholder against recursion
            props: dict[str, Any] = {}
            for f in self.fields.values():
                props[f.name] = {**f.type.schema(defs), "description": f.description}
            body: dict[str, Any] = {
                "type": "object",
                "description": self.description,
                "properties": props,
                "additionalProperties": False,
            }
            required = [f.name for f in self.fields.values() if f.required]
            if required:
                body["required"] = required
            if len(self.one_of) == 1:
                body["oneOf"] = [{"required": [n]} for n in self.one_of[0].names]
            elif self.one_of:
                body["allOf"] = [
                    {"oneOf": [{"required": [n]} for n in g.names]} for g in self.one_of
                ]
            if self.only_with:
                body["dependentRequired"] = {k: [v[0]] for k, v in self.only_with.items()}
            defs[self.name] = body
        return {"$ref": f"#/$defs/{self.name}"}


# --- the file format (docs/file-format.md), one definition per field ------------------------

_CALL = Str("module.path:function, like etl.mes:extract", CALL_PATTERN)
_RUN = Either(
    "a command string or a non-empty list of argv strings",
    scalar=Text("a command string", allow_empty=False, exec_arg="argument"),
    list_=ListOf(
        Text("an argv string", allow_empty=False, exec_arg="argument"),
        hint="a non-empty list of argv strings",
    ),
)
_WITH = MapOf(
    JSONValue(),
    IDENT_PATTERN,
    "a Python keyword name",
    "a mapping of keyword arguments",
)
_ENV = MapOf(
    Text("a string; quote booleans", exec_arg="variable"),
    ENV_NAME_PATTERN,
    "an environment variable name (letters, digits, '_', not starting with a digit)",
    "a mapping of variable names to strings",
)

_RETRIES_ADVICE = (
    "for a dependency that is down for long, wait longer between tries (a longer delay, "
    "backoff: exponential)"
)
_SHARDS_ADVICE = "give each shard a batch of items, or split the work over several runs"
RETRIES = Struct(
    "retries",
    "How a failed stage is retried.",
    [
        Field(
            "max",
            Int(0, MAX_RETRIES, advice=_RETRIES_ADVICE),
            f"Retries after the first attempt (0: none; at most {MAX_RETRIES}).",
        ),
        Field(
            "backoff",
            Enum("fixed", "exponential"),
            "fixed: wait delay each time; exponential: delay, then 2×, 4×, … capped at maxDelay.",
        ),
        Field("delay", Duration(), "Wait before the first retry, like 2s."),
        Field("maxDelay", Duration(), "Cap on the exponential wait, like 1m."),
        Field(
            "onExitCodes",
            ListOf(Int(0, 255), min_items=1),
            "Retry only these exit codes (absent: every failure is retried).",
        ),
    ],
)

SHARDS = Either(
    f"an integer from 1 to {MAX_SHARDS} or {{over: [items]}}",
    scalar=Int(1, MAX_SHARDS, advice=_SHARDS_ADVICE),
    map_=Struct(
        "shardsOver",
        "One shard per item.",
        [
            Field(
                "over",
                ListOf(
                    JSONValue(),
                    hint="a non-empty list of items",
                    max_items=MAX_SHARDS,
                    noun="items (one shard each)",
                    advice=_SHARDS_ADVICE,
                ),
                f"The items (at most {MAX_SHARDS}); each shard gets one as CHUTE_SHARD_ITEM.",
                required=True,
            )
        ],
    ),
)

_RUN_OR_CALL = OneOf(
    ("run", "call"), "a stage runs one command (run) or one Python callable (call)"
)
_WITH_NEEDS_CALL = {
    "with": (
        "call",
        "goes only with call (keyword arguments of the callable); "
        "pass arguments to a command in run",
    )
}

FALLBACK = Struct(
    "fallback",
    "What runs when the stage fails for good.",
    [
        Field("run", _RUN, "Command: a string runs under /bin/sh -c; a list is argv."),
        Field("call", _CALL, "Python callable, module.path:function."),
        Field("with", _WITH, "Keyword arguments of the callable."),
    ],
    one_of=[OneOf(("run", "call"), "a fallback runs one command (run) or one callable (call)")],
    only_with=_WITH_NEEDS_CALL,
)

SCHEDULE = Struct(
    "schedule",
    "When the file runs again and again (absent: once, now).",
    [
        Field("cron", Cron(), "Five-field cron expression, like '0 2 * * *'."),
        Field("at", DateTime(), "One instant, RFC 3339 with offset: 2026-12-01T02:00:00+08:00."),
        Field(
            "every",
            Duration(minimum=1),
            "A fixed interval of at least 1s, like 15m; the first fire "
            "is one interval after the file is accepted.",
        ),
        Field("timezone", TimeZone(), "IANA zone for cron and run dates (default UTC)."),
        Field(
            "misfire",
            Enum("run_once", "skip"),
            "Fires missed beyond grace: run_once "
            "makes one run for all of them (default), skip drops them.",
        ),
        Field("grace", Duration(), "A fire later than this is a misfire (default 10m)."),
        Field(
            "overlap",
            Enum("skip", "queue", "allow"),
            "When the last run still runs: skip this fire (default), queue one, or allow both.",
        ),
    ],
    one_of=[OneOf(("cron", "at", "every"), "a schedule takes exactly one of cron, at or every")],
)

# Stage fields, in the order messages list them.
_NAME = Field(
    "name", Str(NAME_HINT, NAME_PATTERN), "Stage name, unique in the pipeline.", required=True
)
_STAGE_RUN = Field("run", _RUN, "Command: a string runs under /bin/sh -c; a list is argv.")
_STAGE_CALL = Field("call", _CALL, "Python callable, module.path:function, run in the pool.")
_STAGE_WITH = Field("with", _WITH, "Keyword arguments of the callable.")
_DEPENDS_ON = Field(
    "dependsOn",
    ListOf(Str("a stage name", NAME_PATTERN), min_items=0),
    "Stages that must succeed first.",
)
_INPUTS = Field(
    "inputs",
    MapOf(
        Str("a stage name or stage.field.sub", INPUT_REF_PATTERN),
        IDENT_PATTERN,
        "a Python keyword name",
        "a mapping of keyword to upstream output",
    ),
    "Keyword <- upstream output: 'stage' (its data) or 'stage.field.sub'; implies dependsOn.",
)
_CPUS = Field("cpus", Int(1), "CPU cores the task is pinned to (default 1).")
_MEMORY = Field("memory", Size(), "Memory the task needs, like 4GiB.")
_TIMEOUT = Field("timeout", Duration(positive=True), "Wall-time limit per attempt, like 20m.")
_RETRIES = Field("retries", RETRIES, "How a failed stage is retried.")
_SHARDS = Field(
    "shards",
    SHARDS,
    f"Run N copies, or one per item of {{over: [...]}} (at most {MAX_SHARDS}; and at most "
    f"{MAX_RUN_TASKS} tasks per run, a stage counting its shards).",
)
_CACHE = Field("cache", Bool(), "Skip the stage when its cache key is unchanged.")
_VERSION = Field("version", Text(), "Part of the cache key; bump it to invalidate.")
_FALLBACK = Field("fallback", FALLBACK, "Runs when the stage fails for good.")
_ENV_F = Field("env", _ENV, "Environment variables; merged over the pipeline's.")
_WORKDIR = Field("workdir", AbsPath(), "Working directory (absolute path).")

STAGE_FIELDS = (
    _NAME, _STAGE_RUN, _STAGE_CALL, _STAGE_WITH, _DEPENDS_ON, _INPUTS, _CPUS, _MEMORY,
    _TIMEOUT, _RETRIES, _SHARDS, _CACHE, _VERSION, _FALLBACK, _ENV_F, _WORKDIR,
)  # fmt: skip

STAGE = Struct(
    "stage",
    "One step of a pipeline.",
    STAGE_FIELDS,
    one_of=[_RUN_OR_CALL],
    only_with=_WITH_NEEDS_CALL,
)

DEFAULT_FIELDS = (_CPUS, _MEMORY, _TIMEOUT, _RETRIES, _CACHE, _VERSION, _ENV_F, _WORKDIR)
DEFAULTS = Struct(
    "defaults",
    "Values every stage gets unless it sets its own (retries and env merge key by key).",
    DEFAULT_FIELDS,
)

PIPELINE_FIELDS = (
    Field("schedule", SCHEDULE, "When to run again and again (absent: once, now)."),
    Field("priority", Int(), "Higher goes first (default 0)."),
    Field("failFast", Bool(), "true: a failure cancels the running stages."),
    Field("env", _ENV, "Environment variables of every stage."),
    Field("workdir", AbsPath(), "Working directory of every stage (absolute path)."),
    Field("defaults", DEFAULTS, "Values every stage gets unless it sets its own."),
)

PIPELINE_SPEC = Struct(
    "pipelineSpec",
    "A Pipeline: its stages and how it runs.",
    [
        *PIPELINE_FIELDS,
        Field(
            "stages",
            ListOf(
                STAGE,
                hint="a non-empty list of stages",
                max_items=MAX_STAGES,
                noun="stages",
                advice="split the pipeline into several files",
            ),
            f"The stages (at most {MAX_STAGES}).",
            required=True,
        ),
    ],
)

_NO_STAGES = "use kind: Pipeline for stages"
JOB_SPEC = Struct(
    "jobSpec",
    "A Job: one stage's fields and the pipeline fields side by side.",
    [
        *PIPELINE_FIELDS,
        *(
            f
            for f in STAGE_FIELDS
            if f.name not in {"name", "dependsOn", "inputs", "env", "workdir"}
        ),
    ],
    one_of=[OneOf(("run", "call"), "a Job runs one command (run) or one Python callable (call)")],
    only_with=_WITH_NEEDS_CALL,
    forbidden={
        "stages": f"a Job has one stage; {_NO_STAGES}",
        "name": f"a Job's stage is named after metadata.name; remove it, or {_NO_STAGES}",
        "dependsOn": f"a Job has one stage, so nothing to depend on; {_NO_STAGES}",
        "inputs": f"a Job has no upstream stage to take inputs from; {_NO_STAGES}",
    },
)

METADATA = Struct(
    "metadata",
    "Who the file is.",
    [
        Field(
            "name",
            Str(NAME_HINT, NAME_PATTERN),
            "Name of the job or pipeline, like nightly-etl.",
            required=True,
        ),
        Field(
            "labels",
            MapOf(
                Text("a string; quote booleans"),
                LABEL_KEY_PATTERN,
                "a label key (letters, digits, '.', '_', '/', '-')",
                "a mapping of strings",
            ),
            "Free-form string labels, like {team: data}.",
        ),
    ],
)

API_VERSION = Field("apiVersion", Enum("chute/v1"), "Format version: chute/v1.", required=True)
KIND = Field(
    "kind",
    Enum("Job", "Pipeline"),
    "Job: one command; Pipeline: stages with dependencies.",
    required=True,
)
META = Field("metadata", METADATA, "Name and labels.", required=True)
SPEC = Field("spec", Later(), "What runs and when; its fields depend on kind.", required=True)
FILE = Struct("file", "A chute Job or Pipeline file (apiVersion chute/v1).",
              [API_VERSION, KIND, META, SPEC])  # fmt: skip


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a whole spec file, from the definitions above."""
    defs: dict[str, Any] = {}
    FILE.schema(defs)
    top = defs.pop(FILE.name)
    job = JOB_SPEC.schema(defs)
    pipeline = PIPELINE_SPEC.schema(defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:chute:schema:spec:v1",
        "title": "chute Job or Pipeline file (apiVersion chute/v1)",
        **top,
        "if": {"properties": {"kind": {"const": "Job"}}, "required": ["kind"]},
        "then": {"properties": {"spec": job}},
        "else": {"properties": {"spec": pipeline}},
        "$defs": defs,
    }
