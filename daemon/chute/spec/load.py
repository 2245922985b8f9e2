"""Reading a spec file safely: bytes from an untrusted inode, then YAML into line-numbered nodes.

Owns: the file checks (O_NOFOLLOW|O_NONBLOCK open, fstat: regular file, size before reading),
the text checks (UTF-8, no NUL) and the YAML step: a pre-scan of parser events that refuses
aliases, anchors, nesting deeper than MAX_DEPTH and extra documents *before* libyaml composes
anything (composing a 30,000-deep list segfaults the C loader; an alias bomb expands to GBs),
then composition and a walk of our own so every value keeps its line. Not here: what the
values mean (chute.spec.fields, chute.spec.validate), the model (chute.spec.model).
Crash safety: reads only; nothing is written.
Diagnostics: every problem is an Issue in a SpecError, never a traceback. An Issue about the
file as a whole (not found, FIFO, too big) has line 0 and path "".
YAML 1.2: plain scalars are resolved by the YAML 1.2 core schema (chute.spec.yaml12), and
each Node says whether it was written plain (unquoted, untagged), so the fields can refuse a
value YAML 1.1 reads otherwise (chute.spec.scalars).
Limits: mapping keys are taken as the text written (`on:` is the key "on", not True); a key
written twice is an error. The time between fstat and read is not a race: both use one fd.
Cost: hostile files are refused by the pre-scan, before anything is built; a valid file at
the size limit holds tens of thousands of values, each composed, walked and checked, so
validate a big one off the event loop.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chute.spec.yaml12 import NULL_TAG, TAG, CoreLoader, Loader, core_value
from chute.store import taskfiles
from chute.units import format_size

MAX_DEPTH = 64
"""Deepest nesting of lists and mappings a spec may have; a real one needs about 6."""


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in a spec file, printed by `chute validate` as one line.

    `str(issue)` is `file:line: path: message`. Parts that do not apply are left out:
    line 0 (the file as a whole: missing, FIFO, too big) drops `:line`, and an empty path
    (the document as a whole: empty file, syntax error) drops `path: `. So
    `etl.yaml: is a FIFO, not a regular file` and `etl.yaml:3: YAML syntax: ...`.
    """

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line > 0 else self.file
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        """The form written into rejected/<file>.error.json: {path, line, message}."""
        return {"path": self.path, "line": self.line, "message": self.message}


class SpecError(Exception):
    """A spec file that cannot be used: all its problems at once, sorted by line."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = sorted(issues, key=lambda i: i.line)
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass(slots=True)
class Node:
    """A YAML value with the line it starts on (1-based).

    `value` is a dict[str, Node] for a mapping, a list[Node] for a list, else the scalar
    (str, int, float, bool or None, as YAML 1.2 reads it). `text` is the scalar as written
    (None for collections); `plain` is True for a scalar written without quotes or a tag;
    `unread` for one whose tag or text could not be read (already an Issue: `value` is the
    text); `key_lines` holds each mapping key's line.
    """

    line: int
    value: Any
    text: str | None = None
    key_lines: dict[str, int] = field(default_factory=dict)
    plain: bool = False
    unread: bool = False

    @property
    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_list(self) -> bool:
        return isinstance(self.value, list)

    @property
    def is_scalar(self) -> bool:
        return self.text is not None


def read_upto(fd: int, limit: int) -> bytes:
    """At most `limit` bytes from `fd`, whatever its size said (files grow under readers)."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_file(path: str | Path, *, max_file_size: int, display_name: str | None = None) -> bytes:
    """The bytes of `path`, refusing symlinks, non-regular files and files over `max_file_size`.

    The file is opened with O_NOFOLLOW|O_NONBLOCK (a symlink fails with ELOOP, a FIFO does
    not block) and judged by fstat of that descriptor; a too-big file is never read.
    """
    name = display_name if display_name is not None else str(path)

    def fail(message: str) -> SpecError:
        return SpecError([Issue(name, 0, "", message)])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise fail("is a symbolic link; drop the file itself, not a link to it") from None
        raise fail(f"cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fail(f"is {taskfiles.kind(st.st_mode)}, not a regular file; drop a YAML file")
        if st.st_size > max_file_size:
            raise fail(
                f"is {format_size(st.st_size)} ({st.st_size} bytes), over the limit of "
                f"{format_size(max_file_size)} ({max_file_size} bytes); a spec is small — "
                "pass big data by reference, or raise max_file_size in the config"
            )
        # The file may grow after fstat: never read past the limit.
        data = read_upto(fd, max_file_size + 1)
        if len(data) > max_file_size:
            raise fail(
                f"grew past the limit of {format_size(max_file_size)} ({max_file_size} bytes) "
                "while being read; write the file elsewhere, then rename it into place"
            )
        return data
    except OSError as e:
        raise fail(f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def _line_at(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode(data: bytes, name: str) -> str:
    """The text of `data`: UTF-8 (a leading BOM is allowed), no NUL bytes."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise SpecError(
            [
                Issue(
                    name,
                    _line_at(data, nul),
                    "",
                    f"contains a NUL byte (offset {nul}); a spec is a UTF-8 text file",
                )
            ]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            [
                Issue(
                    name,
                    _line_at(data, e.start),
                    "",
                    f"is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                    "save the file as UTF-8",
                )
            ]
        ) from None
    return text.removeprefix("\ufeff")


def _mark_line(e: yaml.YAMLError, text: str) -> int:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    position = getattr(e, "position", None)  # ReaderError: an offset, no mark
    if isinstance(position, int):
        # libyaml counts bytes of the UTF-8 encoding; the pure-Python reader counts characters
        encoded = text.encode("utf-8")
        if Loader is yaml.SafeLoader:
            return text.count("\n", 0, position) + 1
        return _line_at(encoded, position)
    return 0


def _syntax_issue(e: yaml.YAMLError, text: str, name: str) -> Issue:
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
    context = getattr(e, "context", None)
    message = f"YAML syntax: {problem}"
    if context:
        message += f" ({context})"
    if "mapping values are not allowed" in str(problem):
        message += "; quote a value that holds ': ' (run: \"echo 'a: b'\")"
    return Issue(name, max(_mark_line(e, text), 1), "", message)


def prescan(text: str, name: str) -> set[tuple[int, int]]:
    """Refuse what must not reach the composer: aliases, anchors, deep nesting, extra documents.

    Walks parser events only, so it stops at the first offence without building anything.
    Returns where scalars with an explicit tag (`!!str yes`) start, as (line, column): a
    composed node no longer says whether its tag was written or resolved.
    """
    depth = 0
    documents = 0
    tagged: set[tuple[int, int]] = set()
    try:
        for event in yaml.parse(text, Loader=Loader):
            line = event.start_mark.line + 1 if event.start_mark else 0
            if isinstance(event, yaml.ScalarEvent) and event.tag is not None and event.start_mark:
                tagged.add((event.start_mark.line, event.start_mark.column))
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise SpecError(
                    [
                        Issue(
                            name,
                            line,
                            "",
                            "aliases and anchors are not supported; write the value out",
                        )
                    ]
                )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError([_too_deep(name, line)])
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise SpecError(
                        [
                            Issue(
                                name,
                                line,
                                "",
                                "a second YAML document starts here; "
                                "put one Job or Pipeline in each file",
                            )
                        ]
                    )
    except yaml.YAMLError as e:
        if getattr(e, "problem", None) == "exceeded maximum nesting depth":
            # libyaml 0.2.6 (PyYAML 6.0.4) has a limit of its own, which its scanner may
            # reach looking ahead through a flow collection before the first event.
            mark = getattr(e, "problem_mark", None)
            raise SpecError([_too_deep(name, mark.line + 1 if mark else 0)]) from None
        raise SpecError([_syntax_issue(e, text, name)]) from None
    return tagged


def _too_deep(name: str, line: int) -> Issue:
    return Issue(name, line, "", f"nested deeper than {MAX_DEPTH} levels; a spec needs far fewer")


def _tag(tag: str) -> str:
    return "!!" + tag.removeprefix(TAG) if tag.startswith(TAG) else tag


class _Walker:
    """Turns composed yaml nodes into Nodes, collecting issues (tags, keys, duplicates)."""

    def __init__(self, name: str, tagged: set[tuple[int, int]]) -> None:
        self.name = name
        self.tagged = tagged
        self.issues: list[Issue] = []

    def issue(self, line: int, path: str, message: str) -> None:
        self.issues.append(Issue(self.name, line, path, message))

    def walk(self, node: yaml.Node, path: str = "") -> Node:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, line, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != TAG + "seq":
                self.issue(line, path, f"tag {_tag(node.tag)} is not supported; write a plain list")
            return Node(
                line, [self.walk(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            )
        assert isinstance(node, yaml.MappingNode)
        if node.tag != TAG + "map":
            self.issue(line, path, f"tag {_tag(node.tag)} is not supported; write a plain mapping")
        items: dict[str, Node] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.issue(key_line, path, "a key must be a plain word, not a list or mapping")
                continue
            key = str(key_node.value)
            key_path = f"{path}.{key}" if path else key
            if key in key_lines:
                self.issue(
                    key_line,
                    key_path,
                    f"appears twice in one mapping (first at line {key_lines[key]}); "
                    "YAML would silently keep the last — keep one",
                )
                continue
            key_lines[key] = key_line
            items[key] = self.walk(value_node, key_path)
        return Node(line, items, key_lines=key_lines)

    def scalar(self, node: yaml.ScalarNode, line: int, path: str) -> Node:
        text = str(node.value)
        mark = node.start_mark
        plain = not node.style and (mark.line, mark.column) not in self.tagged
        try:
            value = core_value(node.tag, text)
        except KeyError:
            self.issue(line, path, f"tag {_tag(node.tag)} is not supported; write a plain value")
            return Node(line, text, text, unread=True)
        except ValueError as e:
            self.issue(line, path, f"cannot read {_short(text)!r} as {_tag(node.tag)}: {e}")
            return Node(line, text, text, unread=True)
        return Node(line, value, text, plain=plain)


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def parse(data: bytes, name: str) -> tuple[Node, list[Issue]]:
    """The top-level mapping of `data`, every value with its line, and the lesser issues found.

    Raises SpecError when there is no usable document at all. Lesser issues (a duplicate key,
    an unsupported tag) are returned so that validation can report them with the rest.
    """
    root, tagged = _compose(data, name)
    hint = "a spec is a mapping that starts with apiVersion: chute/v1"
    if root is None or (
        isinstance(root, yaml.ScalarNode) and root.tag == NULL_TAG and not root.value
    ):
        raise SpecError([Issue(name, 0 if root is None else 1, "", f"the file is empty; {hint}")])
    if not isinstance(root, yaml.MappingNode):
        what = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        raise SpecError(
            [Issue(name, root.start_mark.line + 1, "", f"the top level is {what}; {hint}")]
        )
    walker = _Walker(name, tagged)
    top = walker.walk(root)
    return top, walker.issues


def _compose(data: bytes, name: str) -> tuple[yaml.Node | None, set[tuple[int, int]]]:
    text = decode(data, name)
    tagged = prescan(text, name)
    try:
        return yaml.compose(text, Loader=CoreLoader), tagged
    except yaml.YAMLError as e:
        raise SpecError([_syntax_issue(e, text, name)]) from None


def load_plain(data: bytes, name: str) -> Any:
    """The YAML document in `data` as plain Python values (dict, list, str, int, float, bool,
    None), read as a spec is (YAML 1.2, no aliases, no duplicate keys, bounded depth); None
    for an empty document. SpecError lists what is wrong. For files other than specs (the
    config), which give their values their own meaning."""
    root, tagged = _compose(data, name)
    if root is None:
        return None
    walker = _Walker(name, tagged)
    top = walker.walk(root)
    if walker.issues:
        raise SpecError(walker.issues)
    return _plain(top)


def _plain(node: Node) -> Any:
    if node.is_map:
        return {k: _plain(v) for k, v in node.value.items()}
    if node.is_list:
        return [_plain(v) for v in node.value]
    return node.value
