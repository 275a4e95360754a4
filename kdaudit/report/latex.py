"""LaTeX tables: pandas to_latex with escaping, then the few symbols mapped to LaTeX."""

from __future__ import annotations

from kdaudit.report.blocks import Table

# Private-use characters mark bold cells; to_latex's escaping leaves them alone.
_BOLD_OPEN, _BOLD_CLOSE = "\ue000", "\ue001"
SYMBOLS = {
    _BOLD_OPEN: r"\textbf{",
    _BOLD_CLOSE: "}",
    "±": r"$\pm$",
    "α": r"$\alpha$",
    "Δ": r"$\Delta$",
    "↓": r"$\downarrow$",
    "↑": r"$\uparrow$",
    "✓": r"\checkmark{}",  # amssymb
    "·": r"$\cdot$",
    "–": "--",
    "−": "-",
}


def table(t: Table) -> str:
    text = t.text.copy()
    if t.bold is not None:
        text = text.where(~t.bold.astype(bool), _BOLD_OPEN + text.astype(str) + _BOLD_CLOSE)
    latex = text.to_latex(
        index=False,
        escape=True,
        caption=t.caption,
        label=f"tab:{t.name}",
        column_format="l" + "r" * (text.shape[1] - 1),
    )
    for symbol, replacement in SYMBOLS.items():
        latex = latex.replace(symbol, replacement)
    return latex


def tables(ts: list[Table]) -> str:
    return "\n".join(table(t) for t in ts)
