"""The kinds of value a spec field can hold, and the structures built from them.

Owns: the Type protocol (check a YAML Node and convert it; describe itself as JSON Schema),
where issues go while a file is checked (Context, INVALID), and the structures: a mapping
with named fields (Struct: unknown fields with a suggestion, "exactly one of", "only with",
fields that have no meaning there), a list (ListOf), a mapping of free keys (MapOf), one type
per YAML shape (Either), and a mapping left for a later rule (Later). Not here: the scalar
values (chute.spec.scalars, chute.spec.schedule_values), the file format built from them
(chute.spec.fields), reading YAML (chute.spec.load).
Crash safety: pure functions; no I/O.
Diagnostics: a wrong value adds an Issue `<path>: <what was found>; <the rule or choices>`;
check() then returns INVALID and the caller carries on, so a file's problems come all at once.
Schema and validator agree: every rule a type can state as JSON Schema is in its schema(),
and patterns are ECMA-262 as editors run them (ASCII classes; Python searches them as ECMA
does, see ecma()).
"""

from __future__ import annotations

import abc
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Final

from chute.spec.load import Issue, Node


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()
"""Returned by check() for a value that produced an Issue."""


@dataclass(slots=True)
class Context:
    """Where issues go while one file is checked."""

    file: str
    issues: list[Issue] = field(default_factory=list)

    def report(self, line: int, path: str, message: str) -> _Invalid:
        self.issues.append(Issue(self.file, line, path, message))
        return INVALID


def check_node(kind: Type, node: Node, path: str, cx: Context) -> Any:
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


def child_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _or(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def suggest(word: str, choices: Sequence[str]) -> str | None:
    """The choice `word` was most likely meant as (a typo, another case), or None."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        return lowered.get(word.lower())
    return close[0]


class Type(abc.ABC):
    """A kind of value: checks and converts a Node, and describes itself as JSON Schema."""

    hint = "a value"
    takes_text = False  # a boolean written here was meant as text: say to quote it

    @abc.abstractmethod
    def check(self, node: Node, path: str, cx: Context) -> Any:
        """The value of `node`, or the issue reported through `cx`."""

    @abc.abstractmethod
    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        """This type as JSON Schema (shared definitions go into `defs`)."""

    def wrong(self, node: Node, path: str, cx: Context) -> _Invalid:
        if node.is_scalar and isinstance(node.value, bool) and self.takes_text:
            return cx.report(node.line, path, f'{node.text} is a boolean; quote it ("{node.text}")')
        return cx.report(node.line, path, f"{found(node)}; expected {self.hint}")


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
        return [
            check_node(self.item, child, f"{path}[{i}]", cx) for i, child in enumerate(node.value)
        ]

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
            key_path = child_path(path, key)
            if not self.key_regex.search(key):
                cx.report(node.key_lines[key], key_path, f"{key!r} is not {self.key_hint}")
                ok = False
                continue
            v = check_node(self.value, child, key_path, cx)
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
        return check_node(t, node, path, cx)

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
            key_path = child_path(path, key)
            key_line = node.key_lines[key]
            if key in self.forbidden:
                cx.report(key_line, key_path, self.forbidden[key])
                continue
            f = self.fields.get(key)
            if f is None:
                names = list(self.fields)
                close = suggest(key, names)
                listing = ", ".join(names)
                cx.report(
                    key_line,
                    key_path,
                    f"unknown field; did you mean {close!r}? (fields here: {listing})"
                    if close
                    else f"unknown field; fields here: {listing}",
                )
                continue
            value = check_node(f.type, child, key_path, cx)
            if value is not INVALID:
                out[key] = value
        for f in self.fields.values():
            if f.required and f.name not in items:
                cx.report(node.line, child_path(path, f.name), f"missing; expected {f.type.hint}")
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
                cx.report(node.key_lines[name], child_path(path, name), message)
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
