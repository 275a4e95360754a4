"""Figures as PNG bytes, drawn on matplotlib Figure objects (no pyplot, no global state)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from kdaudit.report import fmt
from kdaudit.stats import Analysis, SettingResult

COLORS = {"correct": "#3b75af", "incorrect": "#c8553d"}
DPI = 110


def agreement_deltas(analysis: Analysis) -> bytes:
    """Grouped bars of Δcorrect and Δincorrect per treatment setting (KD, FMKD), one panel
    per teacher seed."""
    seeds = sorted({s.teacher_seed for s in analysis.settings})
    per_seed = [[s for s in analysis.settings if s.teacher_seed == seed] for seed in seeds]
    n_bars = [len(p) for p in per_seed] or [1]
    width = min(1.2 + sum(0.6 + 0.85 * n for n in n_bars), 15.0)  # inches
    fig = Figure(figsize=(max(width, 4.5), 3.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(n_bars), sharey=True, squeeze=False, width_ratios=n_bars)[0]
    if not seeds:
        axes[0].text(0.5, 0.5, "no KD settings", ha="center", va="center")
        axes[0].set_axis_off()
        return _png(fig)
    for ax, seed, settings in zip(axes, seeds, per_seed, strict=True):
        _panel(ax, settings, seed)
    axes[0].set_ylabel("agreement(KD) − agreement(B)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=2, frameon=False, fontsize=9)
    return _png(fig)


def _panel(ax, settings: list[SettingResult], seed: int) -> None:
    show_t = len({s.temperature for s in settings if not fmt.is_missing(s.temperature)}) > 1
    show_condition = len({s.condition for s in settings}) > 1  # KD beside FMKD
    x = np.arange(len(settings))
    width = 0.38
    for offset, bucket in ((-width / 2, "correct"), (width / 2, "incorrect")):
        means = [getattr(s.paper_asymmetry, f"delta_{bucket}") for s in settings]
        sems = [getattr(s.paper_asymmetry, f"sem_{bucket}") for s in settings]
        ax.bar(x + offset, means, width, yerr=np.nan_to_num(sems), capsize=3,
               color=COLORS[bucket], label=f"Δ{bucket}")  # fmt: skip
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ticks = [_tick(s, show_t, show_condition) for s in settings]
    ax.set_xticks(x, ticks, fontsize=7.5)
    ax.set_title(f"teacher seed {seed}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _tick(s: SettingResult, show_t: bool, show_condition: bool = False) -> str:
    label = f"{fmt.control_name(s.condition)}\n" if show_condition else ""
    label += f"α={s.alpha:g}"
    label += f"\nT={s.temperature:g}" if show_t and not fmt.is_missing(s.temperature) else ""
    label += "" if fmt.is_missing(s.width) else f"\nw={s.width:g}"
    label += "".join(f"\n{part}" for part in fmt.noise_parts(s.teacher_label_noise))
    a = s.paper_asymmetry
    baseline = a.baseline_correct
    if a.baseline_incorrect != a.baseline_correct:
        baseline = f"{a.baseline_correct}/\n{a.baseline_incorrect}"
    return f"{label}\nB={baseline or fmt.MISSING}"


CONTROL_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def asymmetry_matrix(analysis: Analysis) -> bytes:
    """Δincorrect against Δcorrect for every control (colour) and treatment setting (marker),
    with their 95% intervals: one row per teacher seed (and one pooled), one column per scale.
    Above the diagonal the treatment gained more agreement on the teacher's mistakes."""
    rows = _matrix_rows(analysis)
    fig = Figure(figsize=(8.0, 0.6 + 3.1 * max(1, len(rows))), dpi=DPI, layout="constrained")
    axes = fig.subplots(max(1, len(rows)), 2, squeeze=False)
    if not rows:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no treatment settings", ha="center", va="center")
            ax.set_axis_off()
        return _png(fig)
    controls = list(dict.fromkeys(c.control for _, ss in rows for s in ss for c in s.matrix))
    for (title, settings), row in zip(rows, axes, strict=True):
        for ax, scale in zip(row, ("raw", "headroom"), strict=True):
            _matrix_panel(ax, settings, scale, controls)
            ax.set_title(f"{title}: {scale}", fontsize=9.5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 5),
               frameon=False, fontsize=8)  # fmt: skip
    return _png(fig)


def _matrix_rows(analysis: Analysis) -> list[tuple[str, list[SettingResult]]]:
    seeds = sorted({s.teacher_seed for s in analysis.settings})
    rows = [(f"teacher seed {t}", [s for s in analysis.settings if s.teacher_seed == t])
            for t in seeds]  # fmt: skip
    if analysis.pooled:
        rows.append(("teacher seeds pooled", list(analysis.pooled)))
    return rows


def _matrix_panel(ax, settings: list[SettingResult], scale: str, controls: list[str]) -> None:
    show_t = len({s.temperature for s in settings if not fmt.is_missing(s.temperature)}) > 1
    lo, hi = np.inf, -np.inf
    for i, s in enumerate(settings):
        for cell in s.matrix:
            if cell.scale != scale or fmt.is_missing(cell.delta_correct):
                continue
            x, y = cell.delta_correct, cell.delta_incorrect
            xerr = _err(x, cell.delta_correct_ci)
            yerr = _err(y, cell.delta_incorrect_ci)
            color = CONTROL_COLORS[controls.index(cell.control) % len(CONTROL_COLORS)]
            label = f"vs {fmt.control_name(cell.control)}" if i == 0 else None
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=MARKERS[i % len(MARKERS)], color=color,
                        markersize=5, capsize=2, linewidth=0.9, label=label)  # fmt: skip
            ax.annotate(_tick(s, show_t).split("\nB=")[0].replace("\n", " "), (x, y),
                        fontsize=6.5, xytext=(4, 3), textcoords="offset points")  # fmt: skip
            lo, hi = min(lo, x, y), max(hi, x, y)
    if np.isfinite(lo):
        pad = 0.08 * (hi - lo or 1.0)
        line = np.array([lo - pad, hi + pad])
        ax.plot(line, line, color="0.4", linewidth=0.8, linestyle="--")
        ax.fill_between(line, line, line[-1] + pad, color="#c8553d", alpha=0.06, linewidth=0)
    ax.axhline(0.0, color="0.7", linewidth=0.6)
    ax.axvline(0.0, color="0.7", linewidth=0.6)
    ax.set_xlabel("Δcorrect", fontsize=8.5)
    ax.set_ylabel("Δincorrect", fontsize=8.5)
    ax.tick_params(labelsize=7.5)
    ax.grid(alpha=0.25)


def _err(x: float, interval) -> list[list[float]] | None:
    low, high = interval
    if fmt.is_missing(low) or fmt.is_missing(high):
        return None
    return [[max(0.0, x - low)], [max(0.0, high - x)]]


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


AXIS_LABELS = {"temperature": "temperature T", "width": "student width (fraction of teacher's)"}
LINESTYLES = ("-", "--", ":", "-.")


def delta_curves(sweep, axis: str) -> bytes:
    """Δcorrect and Δincorrect (mean ± SEM, pooled over teacher seeds) against one grid axis
    (temperature or width), one panel per alpha; `sweep` is stats.delta_sweep's frame. When
    the other axis varies too, each of its values gets its own line style."""
    alphas = sorted(sweep["alpha"].unique())
    fig = Figure(figsize=(max(4.5, 3.3 * len(alphas)), 3.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, max(1, len(alphas)), sharey=True, squeeze=False)[0]
    for ax, alpha in zip(axes, alphas, strict=False):
        _curves(ax, sweep[sweep["alpha"] == alpha], axis)
        ax.set_title(f"α={alpha:g}", fontsize=10)
        ax.set_xlabel(AXIS_LABELS[axis])
    axes[0].set_ylabel("agreement(KD) − agreement(B)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=4, frameon=False, fontsize=9)
    return _png(fig)


def _curves(ax, rows, axis: str) -> None:
    other = "width" if axis == "temperature" else "temperature"
    groups = list(rows.groupby(other, dropna=False, sort=True))
    for i, (value, group) in enumerate(groups):
        group = group.sort_values(axis)
        suffix = f" ({other[0]}={value:g})" if len(groups) > 1 else ""
        for bucket in ("correct", "incorrect"):
            ax.errorbar(group[axis], group[f"delta_{bucket}"],
                        yerr=np.nan_to_num(group[f"sem_{bucket}"].to_numpy(float)),
                        color=COLORS[bucket], linestyle=LINESTYLES[i % len(LINESTYLES)],
                        marker="o", markersize=4, capsize=3, label=f"Δ{bucket}{suffix}")  # fmt: skip
    ax.set_xticks(sorted(rows[axis].unique()))
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.grid(alpha=0.3)


NOISE_PANELS = (
    ("transfer", "transfer: agreement(KD) − agreement(SIDDO)"),
    ("raw", "Δcorrect / Δincorrect vs SIDDO (raw)"),
    ("headroom", "Δcorrect / Δincorrect vs SIDDO (headroom)"),
)


def teacher_noise(frame) -> bytes:
    """The teacher-error sweep (report.tables.teacher_noise_frame's rows, pooled over teacher
    seeds when there are several): against the teacher's label-noise rate, the transfer with
    its 95% interval, and Δcorrect (solid) and Δincorrect (dashed) against SIDDO on both
    scales with their 95% intervals; one colour per setting (alpha)."""
    from kdaudit.stats import POOLED

    pooled = frame["teacher_seed"] == POOLED
    rows = frame[pooled] if pooled.any() else frame
    fig = Figure(figsize=(12.0, 3.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(NOISE_PANELS), squeeze=False)[0]
    groups = list(rows.groupby(["alpha", "temperature", "width"], dropna=False, sort=True))
    show_t = rows["temperature"].nunique() > 1
    for i, ((alpha, temperature, width), group) in enumerate(groups):
        group = group.sort_values("teacher_label_noise")
        label = fmt.condition_label("KD", alpha, temperature, show_t, width)
        color = CONTROL_COLORS[i % len(CONTROL_COLORS)]
        _noise_line(axes[0], group, "transfer", color, "-", label)
        for ax, scale in zip(axes[1:], ("raw", "headroom"), strict=True):
            for bucket, style in (("correct", "-"), ("incorrect", "--")):
                name = f"delta_{bucket}_{scale}"
                _noise_line(ax, group, name, color, style, f"{label} Δ{bucket}")
    for ax, (_, title) in zip(axes, NOISE_PANELS, strict=True):
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("teacher label-noise rate")
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted(rows["teacher_label_noise"].unique()))
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=4, frameon=False, fontsize=8)
    return _png(fig)


def _noise_line(ax, group, column: str, color: str, style: str, label: str) -> None:
    x = group["teacher_label_noise"].to_numpy(float)
    y = group[column].to_numpy(float)
    low, high = group[f"{column}_low"].to_numpy(float), group[f"{column}_high"].to_numpy(float)
    # an infinite bound (too few pairs for an exact interval) draws no bar
    yerr = np.nan_to_num(np.vstack([y - low, high - y]), nan=0.0, posinf=0.0, neginf=0.0)
    ax.errorbar(x, y, yerr=np.clip(yerr, 0.0, None), color=color, linestyle=style, marker="o",
                markersize=4, capsize=3, label=label)  # fmt: skip
