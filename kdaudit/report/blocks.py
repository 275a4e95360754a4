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
