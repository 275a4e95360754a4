"""Number and label formatting: the only place where values are rounded."""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

from kdaudit.conditions import label
from kdaudit.metrics import better_directions

MISSING = "–"
ARROWS = {"lower": "↓", "higher": "↑"}


def is_missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x, digits: int = 4) -> str:
    """`digits` significant digits, e.g. 0.1235, 12.35, 1.235e-05."""
    return MISSING if is_missing(x) else f"{float(x):.{digits}g}"


def signed(x, digits: int = 3) -> str:
    return MISSING if is_missing(x) else f"{float(x):+.{digits}g}"


def interval(low, high, unbounded: str = "[unbounded]") -> str:
    """'[+0.01, +0.03]'; `unbounded` when a bound is infinite (too few pairs); '' when unknown."""
    if is_missing(low) or is_missing(high):
        return ""
    if math.isinf(low) or math.isinf(high):
        return unbounded
    return f"[{signed(low)}, {signed(high)}]"


def pct(x) -> str:
    if is_missing(x):
        return MISSING
    text = f"{100 * float(x):.1f}%"
    return "0.0%" if text == "-0.0%" else text


def pval(p) -> str:
    """Exact p-values: 3 significant digits, scientific below 0.001."""
    if is_missing(p):
        return "n/a"
    return f"{float(p):.2e}" if p < 1e-3 else f"{float(p):.3g}"


def integer(x) -> str:
    return MISSING if is_missing(x) else f"{int(x):,}"


def control_name(control: str) -> str:
    """A condition's name in the report, as its registry entry gives it."""
    return label(control)


def baseline_name(correct: str, incorrect: str) -> str:
    if correct == incorrect:
        return control_name(correct)
    return f"{control_name(correct)} (correct) / {control_name(incorrect)} (incorrect)"


# The metrics this report only approximates (top-k inputs), marked wherever a metric is named;
# set for the writing of one report by `marking`.
_MARKED: ContextVar[tuple[frozenset[str], str]] = ContextVar("marked", default=(frozenset(), ""))


@contextmanager
def marking(metrics, mark: str):
    """Within the block, metric_label adds ` (mark)` to each of `metrics`."""
    token = _MARKED.set((frozenset(metrics), mark))
    try:
        yield
    finally:
        _MARKED.reset(token)


def metric_label(metric: str, arrow: bool = True) -> str:
    text = metric.replace("_", " ")
    better = better_directions()
    text = f"{text} {ARROWS[better[metric]]}" if arrow and metric in better else text
    marked, mark = _MARKED.get()
    return f"{text} ({mark})" if metric in marked else text


def condition_label(
    condition: str,
    alpha: float,
    temperature: float,
    show_t: bool,
    width: float = math.nan,
    noise: float = 0.0,
) -> str:
    """Column label: 'siddo', 'kd α=0.5, T=1', 'rcd α=0.5', 'ls α=0.1', 'kd α=0.5, w=0.3',
    'kd α=0.5, noise 0.1' (its teacher's label-noise rate, when not 0)."""
    parts = [] if is_missing(alpha) else [f"α={alpha:g}"]
    if show_t and not is_missing(temperature):
        parts.append(f"T={temperature:g}")
    if not is_missing(width):
        parts.append(f"w={width:g}")
    parts += noise_parts(noise)
    return f"{condition} {', '.join(parts)}" if parts else condition


def noise_parts(noise: float) -> list[str]:
    """'noise 0.1' for a teacher of the teacher-error sweep; nothing for a clean one."""
    return [] if is_missing(noise) or noise == 0 else [f"noise {noise:g}"]


def setting_text(
    alpha: float, temperature: float, width: float = math.nan, noise: float = 0.0
) -> str:
    """Plain-text setting for sentences: 'alpha=0.5, T=1' (', width=0.3' in capacity grids,
    ', noise 0.1' in the teacher-error sweep)."""
    text = f"alpha={alpha:g}" if is_missing(temperature) else f"alpha={alpha:g}, T={temperature:g}"
    text = text if is_missing(width) else f"{text}, width={width:g}"
    return ", ".join([text, *noise_parts(noise)])


def setting_of(s) -> str:
    """setting_text of a setting (a stats.SettingResult): its alpha, T and grid axes."""
    return setting_text(s.alpha, s.temperature, s.width, s.teacher_label_noise)
