"""The report as a list of blocks, rendered by both the HTML and the PDF writer.

Sections build blocks from data; the two renderers only lay them out, so both formats always
carry the same content.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 1                  # 1: section (new page in the PDF), 2: sub-heading


@dataclass(frozen=True)
class Paragraph:
    text: str
    style: str = "body"             # body | lead | note | small


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    numbered: bool = False


@dataclass(frozen=True)
class Chart:
    png: bytes
    title: str                      # drawn inside the image; also the HTML alt text
    aid: str                        # one-line reading aid under the chart
    width_ratio: float = 1.0        # share of the text width


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    title: str | None = None
    numeric: tuple[bool, ...] = ()  # right-align these columns
    emphasis_first: bool = False    # first column in bold (row labels)


@dataclass(frozen=True)
class KeyFigures:
    """A grid of headline numbers (label, value) on the summary page."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PageBreak:
    pass


Block = Heading | Paragraph | Bullets | Chart | Table | KeyFigures | PageBreak


@dataclass
class Document:
    title: str
    subtitle: str
    language: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> "Document":
        self.blocks.extend(blocks)
        return self
