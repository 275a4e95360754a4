"""The report as Markdown: the same blocks as the HTML page, figures as relative paths."""

from __future__ import annotations

from kdaudit.report.blocks import (
    Bullets,
    Details,
    Figure,
    Legend,
    Notice,
    Paragraph,
    Section,
    Table,
)


def render(title: str, meta_line: str, sections: list[Section], footer: str,
           notices: tuple[Notice, ...] = ()) -> str:  # fmt: skip
    parts = [f"# {title}", *(f"> **{n.text}**" for n in notices)]
    if meta_line:
        parts.append(meta_line)
    for section in sections:
        parts.append(f"## {section.title}")
        parts.extend(text for text in map(_block, section.blocks) if text)
    parts.append(f"---\n{footer}")
    return "\n\n".join(parts) + "\n"


def _block(block) -> str:
    if isinstance(block, Table):
        return table(block)
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Bullets):
        leads = block.leads or ("",) * len(block.items)
        return "\n".join(f"- **{lead}**{item}" if lead else f"- {item}"
                         for lead, item in zip(leads, block.items, strict=True))  # fmt: skip
    if isinstance(block, Legend):
        return ""
    if isinstance(block, Figure):
        return f"![{block.caption}]({block.path})"
    if isinstance(block, Details):
        return "\n\n".join([f"### {block.summary}", *(_block(b) for b in block.blocks)])
    raise TypeError(f"unknown report block {type(block).__name__}")


def table(t: Table) -> str:
    columns = [_escape(str(c)) for c in t.text.columns]
    lines = [f"*{_escape(t.caption)}*", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join([":---", *("---:" for _ in columns[1:])]) + "|")
    for i in range(len(t.text)):
        cells = []
        for j in range(len(columns)):
            text = _escape(str(t.text.iat[i, j]))
            bold = t.bold is not None and bool(t.bold.iat[i, j]) and text
            cells.append(f"**{text}**" if bold else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
