"""Text into report.html: escaping, and the number formats the page and its charts share.

Owns: how any value reaches the page's markup. Every string from the spec or the run
passes `esc` (or `attr`, inside an attribute that keeps line breaks).
"""

from __future__ import annotations

import html

from chute.units import format_duration


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def attr(text: str) -> str:
    """An attribute value whose line breaks survive (a tooltip's lines)."""
    return esc(text).replace("\n", "&#10;")


def dur(v: float | None) -> str:
    return "-" if v is None else format_duration(v)


def num(v: float) -> str:
    return f"{v:.1f}"


def clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(chars - 1, 1)] + "…"
