"""The scalar values of a spec: strings, numbers, booleans, choices, durations, sizes, plain data.

Owns: how a YAML scalar is checked and converted (durations to seconds, sizes to bytes,
numbers in env to text, dates in plain data to their text) and written as JSON Schema, and
refusing a value YAML 1.1 and YAML 1.2 read differently where it matters: an unquoted
yes/no/on/off in env, `with` or shards.over, and 1_000, 0b1010, 1:30 or 017 where a number or
a name is expected (chute.spec.load says what each reading made of it). Not here: the
structures (chute.spec.types), cron, instants and time zones (chute.spec.schedule_values),
which field takes which value (chute.spec.fields).
Crash safety: pure functions; no I/O.
Schema and validator agree: integer ranges, enums, and patterns for durations and sizes
with their unit and bounds are in the schema; an integer field takes 2.0 as 2, as JSON
Schema does.
Limits: rules with no JSON Schema form are the validator's alone: byte (not character)
sizes of arguments and `NAME=value`, non-finite numbers in plain data, and the values the
two YAML readings disagree on (a JSON Schema sees the value one reader made, never how it
was written). The schema accepts those and only the validator refuses.
"""

from __future__ import annotations

import math
import re
from datetime import date
from decimal import Decimal
from fractions import Fraction
from typing import Any

from chute.spec.load import Node
from chute.spec.types import INVALID, Context, Type, child_path, ecma, found, suggest
from chute.spec.yaml12 import BOOLEAN_WORDS, yaml11_reading
from chute.units import (  # the parser's own patterns, so the schema cannot drift from it
    DURATION_HINT,
    NUMBER,
    SIZE_HINT,
    SIZE_PATTERN,
    duration_at_least,
    duration_at_most,
    duration_seconds,
    no_unit,
    parse_size,
)

MAX_DURATION_DAYS = 36_500
"""Any duration in a spec: 100 years, far past any real timeout or interval, so that fire
times and deadlines stay within what datetime and the clocks can hold."""


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
    takes_text = True

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

    takes_text = True

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
            close = suggest(node.text, self.choices)
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
        patterns = [duration_at_most(Fraction(MAX_DURATION_DAYS * 86400))]
        if self.minimum is not None:
            patterns.append(duration_at_least(Fraction(self.minimum)))
        elif self.positive:
            patterns.append(duration_at_least(Fraction(0), strict=True))
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


class JSONValue(Type):
    """Any plain value, converted to what JSON can carry (dates become their text)."""

    hint = "a plain value (string, number, boolean, null, list or mapping)"

    def check(self, node: Node, path: str, cx: Context) -> Any:
        if node.is_map:
            out: dict[str, Any] = {}
            for key, child in node.value.items():
                v = self.check(child, child_path(path, key), cx)
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
