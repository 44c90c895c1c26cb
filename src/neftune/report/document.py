"""The report as a tree of blocks, rendered twice: to HTML (:mod:`.html`) and to Markdown (:mod:`.markdown`).

A :class:`Document` is a title, a one-line meta description and :class:`Section` s; a section
holds blocks.  Text inside a block is :data:`Inline`: a plain string, or a list of spans
``(kind, text)`` where kind ``""`` is plain, ``"b"`` bold and ``"v:<verdict>"`` a verdict chip.
Each block class names itself in ``kind`` so that templates can tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "Block",
    "Bullets",
    "Document",
    "Example",
    "Image",
    "Inline",
    "KeyValues",
    "Notice",
    "Para",
    "Section",
    "Span",
    "Table",
    "verdict_span",
]

Span = tuple[str, str]  # (kind, text): kind "" plain, "b" bold, "v:<verdict>" verdict chip
Inline = str | list[Span]


def verdict_span(verdict: str) -> Span:
    """A span that renders ``verdict`` ("better", "within noise", ...) as a coloured chip."""
    return ("v:" + verdict, verdict)


@dataclass
class Para:
    """A paragraph; ``css`` is an optional class (``"summary"``, ``"note"``)."""

    kind: ClassVar[str] = "para"
    content: Inline
    css: str = ""


@dataclass
class Bullets:
    """An unordered list."""

    kind: ClassVar[str] = "bullets"
    items: list[Inline]


@dataclass
class Notice:
    """A boxed message; ``level`` is ``"warn"``, ``"error"`` or ``"info"``."""

    kind: ClassVar[str] = "notice"
    level: str
    content: Inline


@dataclass
class Table:
    """A table with one alignment letter per column (``"l"`` or ``"r"``) in ``align``."""

    kind: ClassVar[str] = "table"
    header: list[str]
    rows: list[list[Inline]]
    align: str = ""
    caption: str = ""
    compact: bool = False  # as wide as its content rather than the page

    def alignment(self) -> str:
        """``align`` padded with ``"l"`` to one letter per header column."""
        return self.align.ljust(len(self.header), "l")


@dataclass
class Image:
    """A plot: its file name under ``plots/`` (without ``.png``), the PNG bytes, alt text and caption."""

    kind: ClassVar[str] = "image"
    name: str
    png: bytes
    alt: str
    caption: str


@dataclass
class Example:
    """One eval example: the instruction, its reference answer and each arm's answer."""

    kind: ClassVar[str] = "example"
    index: int
    instruction: str
    reference: str | None
    outputs: list[tuple[str, str]]  # (arm label, answer)


@dataclass
class KeyValues:
    """A definition list laid out in ``columns`` key/value column pairs."""

    kind: ClassVar[str] = "keyvalues"
    pairs: list[tuple[str, str]]
    title: str = ""
    columns: int = 1


Block = Para | Bullets | Notice | Table | Image | Example | KeyValues


@dataclass
class Section:
    """A titled part of the report; ``anchor`` is its HTML id, ``css`` an optional class."""

    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)
    css: str = ""


@dataclass
class Document:
    """The whole report."""

    title: str
    meta: str
    sections: list[Section]
