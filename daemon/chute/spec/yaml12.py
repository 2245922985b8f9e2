"""How chute reads YAML: the YAML 1.2 core schema, and what YAML 1.1 would have read instead.

Owns: which scalar is a boolean, an integer, a float or null (the YAML 1.2 core schema, as
editors and check-jsonschema read it, not PyYAML's YAML 1.1 rules: only true/false in three
cases are booleans; yes/no/on/off, 1_000, 0b1010, 1:30 and dates are strings; 017 is 17, 0o17
is 15, 1e3 is a number), the loader that resolves plain scalars by it, and yaml11_reading(),
what YAML 1.1 made of a plain scalar when that differs, so a field can refuse a value the two
readings disagree on where it matters (chute.spec.scalars). Not here: reading the file and
walking the document into Nodes (chute.spec.load).
Crash safety: pure; no I/O.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import yaml
from yaml.constructor import SafeConstructor

if TYPE_CHECKING:
    from chute.spec.load import Node

try:
    Loader: type[Any] = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    Loader = yaml.SafeLoader

TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, NULL_TAG = (TAG + t for t in ("str", "int", "float", "bool", "null"))

# The YAML 1.2 core schema (yaml.org/spec/1.2.2, 10.3.2): what a plain scalar is.
_CORE_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)\Z")
_CORE_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z")
_CORE_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z"
)
_CORE_NULL = re.compile(r"^(?:~|null|Null|NULL|)\Z")


class CoreLoader(Loader):  # type: ignore[misc]
    """libyaml's parser, with plain scalars resolved by the YAML 1.2 core schema."""

    yaml_implicit_resolvers: dict[Any, Any] = {}  # noqa: RUF012 (PyYAML's class-level table)


for _resolved, _regex, _first in (
    (_BOOL, _CORE_BOOL, "tTfF"),
    (_INT, _CORE_INT, "-+0123456789"),  # before float: 12 is an int
    (_FLOAT, _CORE_FLOAT, "-+0123456789."),
    (NULL_TAG, _CORE_NULL, ["~", "n", "N", ""]),
):
    CoreLoader.add_implicit_resolver(_resolved, _regex, list(_first))

BOOLEAN_WORDS = frozenset({"yes", "no", "on", "off"})
"""Booleans in YAML 1.1 (in any case here), plain strings in YAML 1.2."""
_YAML11 = SafeConstructor()


def core_value(tag: str, text: str) -> Any:
    """The value of a scalar by the YAML 1.2 core schema; KeyError for a tag it does not
    have (!!timestamp, !!binary, ...), ValueError for text that is not of its tag."""
    if tag == _STR:
        return text
    regex = {_BOOL: _CORE_BOOL, _INT: _CORE_INT, _FLOAT: _CORE_FLOAT, NULL_TAG: _CORE_NULL}[tag]
    if not regex.match(text):
        raise ValueError(f"not a YAML 1.2 {tag.removeprefix(TAG)}")
    if tag == NULL_TAG:
        return None
    if tag == _BOOL:
        return text.lower() == "true"
    if tag == _INT:
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)  # 017 is 17: YAML 1.2 has no leading-zero octal
    special = text.lstrip("+-").lower()
    if special in (".inf", ".nan"):
        value = math.inf if special == ".inf" else math.nan
        return -value if text.startswith("-") else value
    return float(text)


def yaml11_reading(node: Node) -> Any:
    """What YAML 1.1 (PyYAML, and chute before it read YAML 1.2) makes of a plain scalar,
    when that is a boolean or a number other than `node.value`; else None.

    `yes` (any case) -> True, `1_000` -> 1000, `0b1010` -> 10, `1:30` -> 90, `017` -> 15.
    """
    if not node.plain or node.text is None:
        return None
    text = node.text
    if text.lower() in BOOLEAN_WORDS:
        return text.lower() in ("yes", "on")
    for tag, regex in yaml.SafeLoader.yaml_implicit_resolvers.get(text[:1], []):
        if regex.match(text):
            if tag not in (_INT, _FLOAT):
                return None
            try:
                old = _YAML11.construct_object(yaml.ScalarNode(tag, text))
            except (ValueError, OverflowError, yaml.YAMLError):
                return None
            new = node.value
            same = type(old) is type(new) and (old == new or (math.isnan(old) and math.isnan(new)))
            return None if same else old
    return None
