"""One self-contained HTML page: inline CSS, figures as data URIs, no scripts."""

from __future__ import annotations

import base64
from html import escape

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

MARK_CLASSES = {"✓": "mark-yes", "·": "mark-no", "0": "mark-zero"}

CSS = """
:root { --fg: #1d2433; --muted: #5b6475; --line: #d9dde5; --bg-alt: #f5f7fa;
        --ok: #1e7a3c; --warn: #a86400; --no: #8a8f99; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { font-size: 1.6em; margin: 0 0 4px; }
.meta { color: var(--muted); font-size: 0.88em; margin: 0 0 8px; }
h2 { font-size: 1.25em; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
section p { margin: 6px 0; }
ul.verdicts { list-style: none; padding: 0; margin: 0; }
ul.verdicts li { margin: 8px 0; padding: 8px 12px; border-left: 5px solid var(--no);
                 background: var(--bg-alt); border-radius: 3px; }
ul.verdicts li.supported { border-left-color: var(--ok); }
ul.verdicts li.marginal { border-left-color: var(--warn); }
ul.verdicts li.insufficient_n { border-left-color: #9aa0a6; border-left-style: dashed; }
ul.legend { list-style: none; padding: 0; margin: 4px 0 10px; color: var(--muted);
            font-size: 0.86em; }
ul.legend li { display: inline-block; margin-right: 16px; padding-left: 8px;
               border-left: 5px solid var(--no); }
ul.legend li.supported { border-left-color: var(--ok); }
ul.legend li.marginal { border-left-color: var(--warn); }
ul.legend li.insufficient_n { border-left-color: #9aa0a6; border-left-style: dashed; }
.notice { margin: 10px 0; padding: 8px 12px; border: 1px solid var(--warn);
          background: #fff8eb; border-radius: 3px; font-weight: 600; }
.scroll { overflow-x: auto; margin: 6px 0 14px; }
table { border-collapse: collapse; font-size: 0.86em; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: 0 0 4px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: right; white-space: nowrap; }
thead th { background: var(--bg-alt); text-align: center; white-space: normal; min-width: 5em; }
tbody th { text-align: left; font-weight: 600; background: #fbfcfd; }
td .sem { display: block; font-size: 0.82em; color: var(--muted); }
strong .sem { color: var(--fg); }
td.note { text-align: left; white-space: normal; min-width: 16em; }
td.marks { text-align: center; letter-spacing: 0.25em; font-size: 1.1em; }
.mark-yes { color: var(--ok); font-weight: 700; }
.mark-no { color: var(--no); }
.mark-zero { color: var(--warn); font-weight: 700; }
figure { margin: 8px 0 16px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 0.88em; }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--muted); }
footer { color: var(--muted); font-size: 0.82em; margin-top: 40px; border-top: 1px solid var(--line);
         padding-top: 8px; }
"""


def render(title: str, meta_line: str, sections: list[Section], footer: str,
           notices: tuple[Notice, ...] = ()) -> str:  # fmt: skip
    body = "\n".join(_section(s) for s in sections)
    meta = "".join(f'<p class="notice">{escape(n.text)}</p>' for n in notices)
    meta += f'<p class="meta">{escape(meta_line)}</p>' if meta_line else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header><h1>{escape(title)}</h1>{meta}</header>\n{body}\n"
        f"<footer>{escape(footer)}</footer>\n</main>\n</body>\n</html>\n"
    )


def _section(section: Section) -> str:
    inner = "\n".join(_block(b) for b in section.blocks)
    return f'<section id="{escape(section.anchor)}">\n<h2>{escape(section.title)}</h2>\n{inner}\n</section>'


def _block(block) -> str:
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Paragraph):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Bullets):
        return _bullets(block)
    if isinstance(block, Figure):
        return _figure(block)
    if isinstance(block, Legend):
        items = "".join(f'<li class="{escape(c)}">{escape(t)}</li>' for c, t in block.entries)
        return f'<ul class="legend" aria-label="legend">{items}</ul>'
    if isinstance(block, Details):
        inner = "\n".join(_block(b) for b in block.blocks)
        return f"<details>\n<summary>{escape(block.summary)}</summary>\n{inner}\n</details>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _bullets(block: Bullets) -> str:
    classes = block.classes or ("",) * len(block.items)
    css = "verdicts" if block.classes else "plain"
    leads = block.leads or ("",) * len(block.items)
    items = "".join(
        f'<li class="{escape(c)}">{_lead(lead)}{escape(t)}</li>\n'
        for t, c, lead in zip(block.items, classes, leads, strict=True)
    )
    return f'<ul class="{css}">\n{items}</ul>'


def _lead(text: str) -> str:
    return f"<strong>{escape(text)}</strong>" if text else ""


def _figure(block: Figure) -> str:
    data = base64.b64encode(block.png).decode("ascii")
    alt = escape(block.caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def _table(table: Table) -> str:
    columns = list(table.text.columns)
    head = "".join(f'<th scope="col">{escape(str(c))}</th>' for c in columns)
    rows = []
    for i in range(len(table.text)):
        cells = [_cell(table, i, j) for j in range(len(columns))]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    caption = table.caption + (
        " Hover a cell for exact p-values." if table.titles is not None else ""
    )
    return (
        f'<div class="scroll"><table id="table-{escape(table.name)}">'
        f"<caption>{escape(caption)}</caption>\n"
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>"
    )


def _cell(table: Table, i: int, j: int) -> str:
    text = str(table.text.iat[i, j])
    if j == 0:
        return f'<th scope="row">{escape(text)}</th>'
    content = _marks(text) if table.titles is not None else _mean_sem(text)
    if table.bold is not None and bool(table.bold.iat[i, j]):
        content = f"<strong>{content}</strong>"
    attrs = ""
    if table.titles is not None:
        attrs = f' class="marks" title="{escape(str(table.titles.iat[i, j]))}"'
    elif table.text.columns[j] == "note":
        attrs = ' class="note"'
    return f"<td{attrs}>{content}</td>"


def _mean_sem(text: str) -> str:
    """'mean ± sem' with the SEM on its own smaller line, to keep wide tables narrow."""
    mean, sep, sem = text.partition(" ± ")
    if not sep:
        return escape(text)
    return f'{escape(mean)}<span class="sem">± {escape(sem)}</span>'


def _marks(text: str) -> str:
    return "".join(
        f'<span class="{MARK_CLASSES[ch]}">{escape(ch)}</span>'
        if ch in MARK_CLASSES
        else escape(ch)
        for ch in text
    )
