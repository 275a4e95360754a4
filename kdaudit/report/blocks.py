"""The report's content as plain blocks, rendered alike to HTML and Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass(frozen=True)
class Table:
    """Display strings; the first column holds the row headers.

    `bold` marks cells (best means), `titles` adds hover text (HTML only); both have the
    shape of `text` when given.
    """

    name: str
    caption: str
    text: pd.DataFrame
    bold: pd.DataFrame | None = None
    titles: pd.DataFrame | None = None


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    classes: tuple[str, ...] = ()  # one CSS class per item (HTML only)
    leads: tuple[str, ...] = ()  # one bold lead per item, before its text


@dataclass(frozen=True)
class Legend:
    """What the verdict colours mean: (CSS class, meaning) pairs (HTML only: Markdown has no
    colours)."""

    entries: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Notice:
    """A warning the reader must see first (an incomplete grid, a teacher near chance)."""

    text: str


@dataclass(frozen=True)
class Figure:
    path: str  # relative to the report directory
    caption: str
    png: bytes


@dataclass(frozen=True)
class Details:
    """Collapsed in HTML; a sub-heading in Markdown."""

    summary: str
    blocks: tuple = ()


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    blocks: tuple = field(default_factory=tuple)
