"""Display tables (formatted strings) built from the run table and the analysis."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kdaudit.metrics import BETTER, FUNCTIONAL_METRICS
from kdaudit.report import fmt
from kdaudit.report.blocks import Table
from kdaudit.stats import CONTROLS, SETTING_KEYS, Analysis, ControlComparison

TEACHER_COLUMNS = ("teacher_seed", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
CONDITION_ORDER = ("siddo", "kd", "rcd", "ls")
TEACHER_COUNTS = {
    "n_teacher_correct": "teacher-correct test examples",
    "n_teacher_incorrect": "teacher-incorrect test examples",
}
MARKS = {"significant": "✓", "not": "·", "all_zero": "0", "missing": fmt.MISSING}


def _key(condition: str, alpha: float, temperature: float) -> tuple:
    """A hashable condition key (NaN never equals itself, so it becomes None)."""
    return (condition, _none(alpha), _none(temperature))


def _none(x):
    return None if fmt.is_missing(x) else float(x)


def _condition_sort(key: tuple) -> tuple:
    condition, alpha, temperature = key
    rank = (
        CONDITION_ORDER.index(condition) if condition in CONDITION_ORDER else len(CONDITION_ORDER)
    )
    return (
        rank,
        condition,
        -1.0 if alpha is None else alpha,
        -1.0 if temperature is None else temperature,
    )


def metric_order(metrics) -> list[str]:
    """Functional metrics first, then the other known metrics, then the rest by name."""
    known = [*FUNCTIONAL_METRICS, *(m for m in BETTER if m not in FUNCTIONAL_METRICS)]
    present = set(metrics) - set(TEACHER_COUNTS)
    return [m for m in known if m in present] + sorted(present - set(known))


def run_counts(runs: pd.DataFrame) -> dict[tuple, int]:
    """Runs per (teacher_seed, condition key)."""
    grouped = runs.groupby(list(SETTING_KEYS), dropna=False)["run_id"].nunique()
    return {(int(s), *_key(c, a, t)): int(n) for (s, c, a, t), n in grouped.items()}


# ----------------------------------------------------------------------------- teachers


def teachers_frame(teachers: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The teacher table at full precision, with the teacher-correct/incorrect counts."""
    missing = [c for c in TEACHER_COLUMNS if c not in teachers.columns]
    if missing:
        raise ValueError(f"teachers is missing columns {missing}; expected {list(TEACHER_COLUMNS)}")
    extra = ["n_params"] if "n_params" in teachers.columns else []
    frame = teachers[[*TEACHER_COLUMNS, *extra]].sort_values("teacher_seed")
    counts = runs[runs["metric"].isin(list(TEACHER_COUNTS))]
    if not counts.empty:
        per_seed = counts.pivot_table(index="teacher_seed", columns="metric", values="value")
        frame = frame.merge(per_seed.reset_index(), on="teacher_seed", how="left")
    return frame.reset_index(drop=True)


def teachers_table(frame: pd.DataFrame) -> Table:
    text = pd.DataFrame({"teacher seed": frame["teacher_seed"].map(str)})
    for column in TEACHER_COLUMNS[1:]:
        text[column.replace("_", " ")] = frame[column].map(fmt.num)
    if "n_params" in frame:
        text["parameters"] = frame["n_params"].map(fmt.integer)
    for column, label in TEACHER_COUNTS.items():
        if column in frame:
            text[label] = frame[column].map(fmt.integer)
    return Table("teachers", "Teachers: train and test loss and accuracy", text)


# ----------------------------------------------------------------------------- mean ± SEM


def summary_table(summary: pd.DataFrame, counts: dict[tuple, int], seed: int) -> Table:
    """Rows = metrics, columns = conditions; best mean in bold, n in the column header."""
    s = summary[summary["teacher_seed"] == seed]
    cells = {
        (*_key(r.condition, r.alpha, r.temperature), r.metric): (r.mean, r.sem)
        for r in s.itertuples(index=False)
    }
    columns = sorted({k[:3] for k in cells}, key=_condition_sort)
    show_t = len({k[2] for k in columns if k[2] is not None}) > 1
    headers = [
        f"{fmt.condition_label(c, a, t, show_t or c == 'kd')} (n={counts.get((seed, c, a, t), 0)})"
        for c, a, t in columns
    ]
    metrics = metric_order(s["metric"].unique())
    text = pd.DataFrame([_summary_row(cells, columns, m) for m in metrics], columns=headers)
    bold = pd.DataFrame([_best_row(cells, columns, m) for m in metrics], columns=headers)
    text.insert(0, "metric", [fmt.metric_label(m) for m in metrics])
    bold.insert(0, "metric", False)
    caption = f"Teacher seed {seed}: mean ± SEM over runs (best mean in bold)"
    return Table(f"summary_seed{seed}", caption, text, bold=bold)


def _summary_row(cells, columns, metric) -> list[str]:
    out = []
    for column in columns:
        mean, sem = cells.get((*column, metric), (math.nan, math.nan))
        out.append(fmt.MISSING if fmt.is_missing(mean) else f"{fmt.num(mean)} ± {fmt.num(sem, 2)}")
    return out


def _best_row(cells, columns, metric) -> list[bool]:
    means = np.array([cells.get((*c, metric), (math.nan,))[0] for c in columns], dtype=float)
    if metric not in BETTER or np.isnan(means).all():
        return [False] * len(columns)
    best = np.nanmin(means) if BETTER[metric] == "lower" else np.nanmax(means)
    return list(means == best)


# ----------------------------------------------------------------------------- significance


def _setting_keys(analysis: Analysis) -> list[tuple[float, float]]:
    return sorted({(s.alpha, s.temperature) for s in analysis.settings})


def _comparisons(analysis: Analysis) -> dict[tuple, ControlComparison]:
    return {
        (c.teacher_seed, c.alpha, c.temperature, c.control): c
        for s in analysis.settings
        for c in s.comparisons
    }


def significance_table(analysis: Analysis) -> Table:
    """Rows = setting x control, columns = tested metrics; one mark per teacher seed."""
    seeds = sorted({s.teacher_seed for s in analysis.settings})
    found = _comparisons(analysis)
    metrics = list(analysis.options.metrics)
    text_rows, title_rows = [], []
    for alpha, temperature in _setting_keys(analysis):
        for control in CONTROLS:
            keys = [(seed, alpha, temperature, control) for seed in seeds]
            if not any(k in found for k in keys):
                continue
            label = f"{fmt.condition_label('kd', alpha, temperature, True)} vs {fmt.control_name(control)}"
            marks = [_marks(found, keys, m) for m in metrics]
            text_rows.append([label, *(m[0] for m in marks)])
            title_rows.append([label, *(m[1] for m in marks)])
    headers = ["setting vs control", *(fmt.metric_label(m) for m in metrics)]
    seeds_text = ", ".join(map(str, seeds))
    caption = (
        f"Significance, one mark per teacher seed ({seeds_text}): {MARKS['significant']} "
        f"significant in the better direction, {MARKS['not']} not, {MARKS['all_zero']} all "
        "differences zero; functional metrics after BH FDR."
    )
    return Table(
        "significance",
        caption,
        pd.DataFrame(text_rows, columns=headers),
        titles=pd.DataFrame(title_rows, columns=headers),
    )


def _marks(found, keys, metric) -> tuple[str, str]:
    marks, titles = [], []
    for key in keys:
        comparison = found.get(key)
        test = None if comparison is None else comparison.test(metric)
        if test is None:
            marks.append(MARKS["missing"])
            continue
        kind = "all_zero" if test.all_zero else "significant" if test.significant else "not"
        marks.append(MARKS[kind])
        adjusted = "" if fmt.is_missing(test.p_adjusted) else f", BH p={fmt.pval(test.p_adjusted)}"
        titles.append(f"seed {key[0]}: p={fmt.pval(test.pvalue)}{adjusted}, n={test.n}")
    return "".join(marks), "; ".join(titles)


def pvalues_table(analysis: Analysis) -> Table:
    frame = analysis.tests_frame()
    text = pd.DataFrame(
        {
            "teacher seed": frame["teacher_seed"].map(str),
            "setting": [
                fmt.condition_label(c, a, t, True)
                for c, a, t in zip(
                    frame["condition"], frame["alpha"], frame["temperature"], strict=True
                )
            ],
            "control": frame["control"].map(fmt.control_name),
            "metric": frame["metric"].map(fmt.metric_label),
            "n": frame["n"].map(str),
            "n nonzero": frame["n_nonzero"].map(str),
            "W+": frame["statistic"].map(fmt.num),
            "p": frame["pvalue"].map(fmt.pval),
            "p (BH)": frame["p_adjusted"].map(lambda p: "" if fmt.is_missing(p) else fmt.pval(p)),
            "significant": [
                "all zero" if z else "yes" if s else "no"
                for z, s in zip(frame["all_zero"], frame["significant"], strict=True)
            ],
            "mean KD": frame["mean_treatment"].map(fmt.num),
            "mean control": frame["mean_control"].map(fmt.num),
        }
    )
    caption = "Every test: one-sided Wilcoxon signed-rank, exact p-values"
    return Table("pvalues", caption, text)


# ----------------------------------------------------------------------------- verdicts


def verdicts_table(analysis: Analysis) -> Table:
    frame = analysis.verdicts_frame()
    n_functional = len(FUNCTIONAL_METRICS)
    text = pd.DataFrame(
        {
            "teacher seed": frame["teacher_seed"].map(str),
            "setting": [
                fmt.condition_label(c, a, t, True)
                for c, a, t in zip(
                    frame["condition"], frame["alpha"], frame["temperature"], strict=True
                )
            ],
            "n": frame["n"].map(str),
            "verdict": frame["verdict"].str.replace("_", " "),
            "significant": frame["n_significant"].map(lambda k: f"{k}/{n_functional}"),
            "improvement over SIDDO": frame["relative_improvement"].map(fmt.pct),
            "asymmetry": frame["asymmetry"],
            "Δcorrect": frame["delta_correct"].map(fmt.signed),
            "Δincorrect": frame["delta_incorrect"].map(fmt.signed),
            "baseline B": frame["best_control"],
            "asymmetry p": frame["asymmetry_p"].map(fmt.pval),
            "note": frame["note"],
        }
    )
    return Table("verdicts", "Verdicts per setting", text)


def deltas_table(analysis: Analysis) -> Table:
    rows = []
    for s in analysis.settings:
        a = s.asymmetry
        rows.append(
            [
                str(s.teacher_seed),
                fmt.condition_label(s.condition, s.alpha, s.temperature, True),
                fmt.baseline_name(a.baseline_correct, a.baseline_incorrect) if a.n else fmt.MISSING,
                f"{fmt.signed(a.delta_correct)} ± {fmt.num(a.sem_correct, 2)}",
                f"{fmt.signed(a.delta_incorrect)} ± {fmt.num(a.sem_incorrect, 2)}",
                str(a.n),
            ]
        )
    headers = ["teacher seed", "setting", "baseline B", "Δcorrect ± SEM", "Δincorrect ± SEM", "n"]
    return Table(
        "deltas", "Agreement deltas over the baseline B", pd.DataFrame(rows, columns=headers)
    )


def runs_table(counts: dict[tuple, int]) -> Table:
    """Rows = conditions, columns = teacher seeds, cells = number of runs."""
    seeds = sorted({k[0] for k in counts})
    keys = sorted({k[1:] for k in counts}, key=_condition_sort)
    rows = [
        [fmt.condition_label(*key, True), *(str(counts.get((seed, *key), 0)) for seed in seeds)]
        for key in keys
    ]
    headers = ["condition", *(f"teacher seed {seed}" for seed in seeds)]
    return Table("runs", "Runs per condition (n)", pd.DataFrame(rows, columns=headers))
