"""Display tables (formatted strings) built from the run table and the analysis."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kdaudit.conditions import condition, is_treatment, order
from kdaudit.conditions import label as condition_label
from kdaudit.metrics import better_directions, functional_metrics
from kdaudit.report import fmt
from kdaudit.report.blocks import Table
from kdaudit.stats import (
    AXES,
    POOLED,
    SETTING_KEYS,
    Analysis,
    ControlComparison,
    first_treatment,
    setting_keys,
    with_axes,
)

TEACHER_COLUMNS = ("teacher_seed", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
# the teacher-error sweep's columns of a noisy teacher (kdaudit.store.tables.NOISE_COLUMNS)
NOISE_COLUMNS = ("label_noise_fraction", "noisy_train_accuracy", "noisy_train_loss")
TEACHER = ["teacher_seed", "teacher_label_noise"]  # one teacher: its seed and noise rate
TEACHER_COUNTS = {
    "n_teacher_correct": "teacher-correct test examples",
    "n_teacher_incorrect": "teacher-incorrect test examples",
}
MARKS = {"significant": "✓", "not": "·", "all_zero": "0", "missing": fmt.MISSING}


def _key(
    condition: str, alpha: float, temperature: float, width: float = math.nan, noise: float = 0.0
) -> tuple:
    """A hashable condition key (NaN never equals itself, so it becomes None); the grid axes
    (stats.AXES: width, teacher label noise) last."""
    return (condition, _none(alpha), _none(temperature), _none(width), _none(noise))


def _setting_key(s) -> tuple:
    """The condition key of a setting or comparison (stats.SettingResult, ControlComparison)."""
    return _key(s.condition, s.alpha, s.temperature, *(getattr(s, axis) for axis in AXES))


def _row_keys(frame: pd.DataFrame) -> list[tuple]:
    """The condition key of each row of a frame with the setting columns (axes defaulted)."""
    frame = with_axes(frame)
    columns = [frame[c] for c in ("condition", "alpha", "temperature", *AXES)]
    return [_key(*values) for values in zip(*columns, strict=True)]


def _none(x):
    return None if fmt.is_missing(x) else float(x)


def _condition_sort(key: tuple) -> tuple:
    condition, alpha, temperature, width, noise = key
    return (_order(noise), _order(width), order(condition), condition, _order(alpha),
            _order(temperature))  # fmt: skip


def _order(x) -> float:
    return -1.0 if x is None else x


def _label(key: tuple, show_t: bool) -> str:
    """The display label of a condition key (condition, alpha, T, width, noise)."""
    condition, alpha, temperature, width, noise = key
    return fmt.condition_label(condition, alpha, temperature, show_t, _nan(width), noise)


def _nan(x) -> float:
    return math.nan if x is None else x


def metric_order(metrics) -> list[str]:
    """Functional metrics first, then the other known metrics, then the rest by name."""
    functional = functional_metrics()
    known = [*functional, *(m for m in better_directions() if m not in functional)]
    present = set(metrics) - set(TEACHER_COUNTS)
    return [m for m in known if m in present] + sorted(present - set(known))


def run_counts(runs: pd.DataFrame) -> dict[tuple, int]:
    """Runs per (teacher_seed, condition key)."""
    grouped = with_axes(runs).groupby(list(SETTING_KEYS), dropna=False)["run_id"].nunique()
    return {(int(s), *_key(*rest)): int(n) for (s, *rest), n in grouped.items()}


def table_groups(summary: pd.DataFrame) -> list[tuple[int, float, float]]:
    """(teacher seed, width, teacher label noise) of each summary table: one per teacher
    (seed and noise rate), and per width in capacity grids (ten widths of seven conditions
    would not fit one table)."""
    groups = with_axes(summary)[["teacher_seed", *AXES]].drop_duplicates()
    keys = {(int(s), _none(w), _none(n)) for s, w, n in groups.itertuples(index=False)}
    ordered = sorted(keys, key=lambda k: (k[0], _order(k[2]), _order(k[1])))
    return [(s, _nan(w), n) for s, w, n in ordered]


# ----------------------------------------------------------------------------- teachers


def teachers_frame(teachers: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The teacher table at full precision, with the teacher-correct/incorrect counts."""
    missing = [c for c in TEACHER_COLUMNS if c not in teachers.columns]
    if missing:
        raise ValueError(f"teachers is missing columns {missing}; expected {list(TEACHER_COLUMNS)}")
    extra = [c for c in ("n_params", *NOISE_COLUMNS) if c in teachers.columns]
    frame = with_teacher_noise(teachers)[[*TEACHER, *TEACHER_COLUMNS[1:], *extra]]
    frame = frame.sort_values(TEACHER)
    counts = with_axes(runs[runs["metric"].isin(list(TEACHER_COUNTS))])
    if not counts.empty:
        per_teacher = counts.pivot_table(index=TEACHER, columns="metric", values="value")
        frame = frame.merge(per_teacher.reset_index(), on=TEACHER, how="left")
    return frame.reset_index(drop=True)


def with_teacher_noise(teachers: pd.DataFrame) -> pd.DataFrame:
    """A teacher table with its teacher_label_noise column (0.0: stored before the sweep, or
    from kdaudit compare)."""
    if TEACHER[1] in teachers.columns:
        return teachers.astype({TEACHER[1]: np.float64})
    return teachers.assign(**{TEACHER[1]: 0.0})


def teachers_table(frame: pd.DataFrame) -> Table:
    text = pd.DataFrame({"teacher seed": frame["teacher_seed"].map(str)})
    swept = (with_teacher_noise(frame)[TEACHER[1]] != 0).any()
    if swept:
        text["label noise"] = frame[TEACHER[1]].map(lambda x: f"{x:g}")
    for column in TEACHER_COLUMNS[1:]:
        text[column.replace("_", " ")] = frame[column].map(fmt.num)
    if swept and "noisy_train_loss" in frame:
        text["labels changed"] = frame["label_noise_fraction"].map(fmt.pct)
        text["train loss (noisy labels)"] = frame["noisy_train_loss"].map(fmt.num)
        text["train accuracy (noisy labels)"] = frame["noisy_train_accuracy"].map(fmt.num)
    if "n_params" in frame:
        text["parameters"] = frame["n_params"].map(fmt.integer)
    for column, label in TEACHER_COUNTS.items():
        if column in frame:
            text[label] = frame[column].map(fmt.integer)
    return Table("teachers", "Teachers: train and test loss and accuracy", text)


# ----------------------------------------------------------------------------- mean ± SEM


def summary_table(
    summary: pd.DataFrame,
    counts: dict[tuple, int],
    seed: int,
    width: float = math.nan,
    noise: float = 0.0,
) -> Table:
    """Rows = metrics, columns = conditions; best mean in bold, n in the column header."""
    s = with_axes(summary)
    s = s[s["teacher_seed"] == seed]
    s = s[
        np.isclose(s["width"], width, equal_nan=True) & np.isclose(s["teacher_label_noise"], noise)
    ]
    keys = _row_keys(s)
    cells = {(*k, m): (mean, sem) for k, m, mean, sem in
             zip(keys, s["metric"], s["mean"], s["sem"], strict=True)}  # fmt: skip
    columns = sorted({k[:-1] for k in cells}, key=_condition_sort)
    show_t = len({k[2] for k in columns if k[2] is not None}) > 1
    # the width and noise are the table's, in its caption: column labels leave them out
    headers = [
        f"{_label((c, a, t, None, None), show_t or is_treatment(c))} (n={counts.get((seed, c, a, t, w, n), 0)})"
        for c, a, t, w, n in columns
    ]
    metrics = metric_order(s["metric"].unique())
    text = pd.DataFrame([_summary_row(cells, columns, m) for m in metrics], columns=headers)
    bold = pd.DataFrame([_best_row(cells, columns, m) for m in metrics], columns=headers)
    text.insert(0, "metric", [fmt.metric_label(m) for m in metrics])
    bold.insert(0, "metric", False)
    teacher = f"Teacher seed {seed}"
    name = f"summary_seed{seed}"
    if noise:
        teacher += f", teacher label noise {noise:g}"
        name += f"_noise{noise:g}"
    if not fmt.is_missing(width):
        teacher += f", student width {width:g}"
        name += f"_w{width:g}"
    caption = f"{teacher}: mean ± SEM over runs (best mean in bold)"
    return Table(name, caption, text, bold=bold)


def _summary_row(cells, columns, metric) -> list[str]:
    out = []
    for column in columns:
        mean, sem = cells.get((*column, metric), (math.nan, math.nan))
        out.append(fmt.MISSING if fmt.is_missing(mean) else f"{fmt.num(mean)} ± {fmt.num(sem, 2)}")
    return out


def _best_row(cells, columns, metric) -> list[bool]:
    means = np.array([cells.get((*c, metric), (math.nan,))[0] for c in columns], dtype=float)
    better = better_directions()
    if metric not in better or np.isnan(means).all():
        return [False] * len(columns)
    best = np.nanmin(means) if better[metric] == "lower" else np.nanmax(means)
    return list(means == best)


# ----------------------------------------------------------------------------- significance


def _setting_keys(analysis: Analysis) -> dict[tuple, tuple[str, ...]]:
    """(treatment, alpha, T, width, noise) -> its controls in the design's order, in row order."""
    controls: dict[tuple, dict[str, None]] = {}
    for s in analysis.settings:
        key = _setting_key(s)
        controls.setdefault(key, {}).update(dict.fromkeys(c.control for c in s.comparisons))
    rank = {c: i for i, c in enumerate(dict.fromkeys(s.condition for s in analysis.settings))}
    order = sorted(controls, key=lambda k: (rank[k[0]], _order(k[4]), _order(k[3]), k[1],
                                            _order(k[2])))  # fmt: skip
    return {k: tuple(controls[k]) for k in order}


def _comparisons(analysis: Analysis) -> dict[tuple, ControlComparison]:
    return {
        (c.teacher_seed, *_setting_key(c), c.control): c
        for s in analysis.settings
        for c in s.comparisons
    }


def significance_table(analysis: Analysis) -> Table:
    """Rows = setting x control, columns = tested metrics; one mark per teacher seed."""
    seeds = sorted({s.teacher_seed for s in analysis.settings})
    found = _comparisons(analysis)
    metrics = list(analysis.options.metrics)
    text_rows, title_rows = [], []
    for setting_key, controls in _setting_keys(analysis).items():
        for control in controls:
            keys = [(seed, *setting_key, control) for seed in seeds]
            setting = _label(setting_key, True)
            label = f"{setting} vs {fmt.control_name(control)}"
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
            "setting": _setting_labels(frame),
            "control": frame["control"].map(fmt.control_name),
            "metric": frame["metric"].map(fmt.metric_label),
            "n": frame["n"].map(str),
            "n nonzero": frame["n_nonzero"].map(str),
            "W+": frame["statistic"].map(fmt.num),
            "p": frame["pvalue"].map(fmt.pval),
            "p (FDR)": frame["p_adjusted"].map(lambda p: "" if fmt.is_missing(p) else fmt.pval(p)),
            "significant": [
                "all zero" if z else "yes" if s else "no"
                for z, s in zip(frame["all_zero"], frame["significant"], strict=True)
            ],
            "effect size r": frame["effect_size"].map(lambda r: fmt.signed(r, 2)),
            "estimate (HL) [95% CI]": [
                f"{fmt.signed(e)} {_ci((lo, hi))}"
                for e, lo, hi in zip(
                    frame["estimate"], frame["ci_low"], frame["ci_high"], strict=True
                )  # fmt: skip
            ],
            "mean treatment": frame["mean_treatment"].map(fmt.num),
            "mean control": frame["mean_control"].map(fmt.num),
        }
    )
    caption = ("Every test: one-sided Wilcoxon signed-rank, exact p-values; effect size: "
               "rank-biserial (+ = treatment better); estimate: Hodges-Lehmann of treatment − "
               "control")  # fmt: skip
    return Table("pvalues", caption, text)


# ----------------------------------------------------------------------------- verdicts


def verdicts_table(analysis: Analysis) -> Table:
    frame = analysis.verdicts_frame()
    n_functional = len(functional_metrics())
    text = pd.DataFrame(
        {
            "teacher seed": frame["teacher_seed"].map(str),
            "setting": _setting_labels(frame),
            "n": frame["n"].map(str),
            "verdict": frame["verdict"].str.replace("_", " "),
            "significant": frame["n_significant"].map(lambda k: f"{k}/{n_functional}"),
            "improvement over SIDDO": frame["relative_improvement"].map(fmt.pct),
            "seeds needed": frame["seeds_needed"].map(_seeds),
            "asymmetry (robust)": frame["asymmetry"],
            "paper's label": frame["paper_asymmetry"],
            "Δcorrect (paper)": frame["delta_correct"].map(fmt.signed),
            "Δincorrect (paper)": frame["delta_incorrect"].map(fmt.signed),
            "baseline B": frame["best_control"],
            "paper p": frame["asymmetry_p"].map(fmt.pval),
            "note": frame["note"],
        }
    )
    return Table("verdicts", "Verdicts per setting", text)


def headline_table(analysis: Analysis) -> Table:
    """Per setting: the transfer verdict, the robust asymmetry label and the paper's."""
    rows = [[str(s.teacher_seed),
             _label(_setting_key(s), True), str(s.n),
             s.verdict.replace("_", " "), s.asymmetry, s.paper_asymmetry.label]
            for s in analysis.settings]  # fmt: skip
    headers = ["teacher seed", "setting", "n", "transfer", "asymmetry (robust)",
               "asymmetry (paper's rule)"]  # fmt: skip
    return Table("headline", "Verdicts at a glance", pd.DataFrame(rows, columns=headers))


def _seeds(n) -> str:
    if fmt.is_missing(n):
        return fmt.MISSING
    return "∞" if math.isinf(n) else str(int(n))


def pooled_table(analysis: Analysis) -> Table:
    """One row per setting pooled over teacher seeds."""
    rows = [[_label(_setting_key(s), True),
             str(s.n_teachers),
             ", ".join(f"{n} {v.replace('_', ' ')}" for v, n in (s.teacher_verdicts or {}).items()),
             str(s.n), s.verdict.replace("_", " "), s.asymmetry, s.asymmetry_why]
            for s in analysis.pooled]  # fmt: skip
    headers = ["setting", "teachers", "verdicts per teacher", "pairs", "pooled verdict",
               "asymmetry (robust)", "cells that disagree"]  # fmt: skip
    return Table("pooled", "Teacher seeds pooled", pd.DataFrame(rows, columns=headers))


def matrix_table(analysis: Analysis, pooled: bool = False) -> Table:
    """The asymmetry matrix: one row per (setting, control, scale)."""
    rows = []
    for s in analysis.pooled if pooled else analysis.settings:
        seed = "pooled" if pooled else str(s.teacher_seed)
        setting = _label(_setting_key(s), True)
        for c in s.matrix:
            rows.append([seed, setting, fmt.control_name(c.control), c.scale, str(c.n),
                         f"{fmt.signed(c.delta_correct)} {_ci(c.delta_correct_ci)}",
                         f"{fmt.signed(c.delta_incorrect)} {_ci(c.delta_incorrect_ci)}",
                         f"{fmt.signed(c.difference)} {_ci(c.difference_ci)}",
                         fmt.pval(c.p_negative), fmt.pval(c.p_positive), c.label,
                         c.note])  # fmt: skip
    headers = ["teacher seed", "setting", "control", "scale", "n", "Δcorrect [95% CI]",
               "Δincorrect [95% CI]", "Δincorrect − Δcorrect (HL) [95% CI]", "p negative",
               "p positive", "label", "note"]  # fmt: skip
    name = "asymmetry_matrix_pooled" if pooled else "asymmetry_matrix"
    caption = "Asymmetry matrix" + (" (teacher seeds pooled)" if pooled else "")
    return Table(name, caption, pd.DataFrame(rows, columns=headers))


def _ci(bounds) -> str:
    return fmt.interval(*bounds)


def _setting_labels(frame: pd.DataFrame) -> list[str]:
    return [_label(key, True) for key in _row_keys(frame)]


def deltas_table(analysis: Analysis) -> Table:
    rows = []
    for s in analysis.settings:
        a = s.paper_asymmetry
        rows.append(
            [
                str(s.teacher_seed),
                _label(_setting_key(s), True),
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
        [_label(key, True), *(str(counts.get((seed, *key), 0)) for seed in seeds)] for key in keys
    ]
    headers = ["condition", *(f"teacher seed {seed}" for seed in seeds)]
    return Table("runs", "Runs per condition (n)", pd.DataFrame(rows, columns=headers))


# ----------------------------------------------------------------------------- sweeps


def sweep_table(sweep: pd.DataFrame, axis: str) -> Table:
    """One row per (alpha, axis value): the agreement deltas pooled over teacher seeds."""
    sweep = sweep.sort_values(["alpha", *([] if axis == "width" else ["width"]), axis])
    text = pd.DataFrame({"α": sweep["alpha"].map(lambda a: f"{a:g}")})
    for column in ("temperature", "width"):
        if column == axis or sweep[column].nunique() > 1:
            text[column.replace("temperature", "T")] = sweep[column].map(fmt.num)
    text["n"] = sweep["n"].map(str)
    for label, mean, err in (("Δcorrect", "delta_correct", "sem_correct"),
                             ("Δincorrect", "delta_incorrect", "sem_incorrect"),
                             ("Δincorrect − Δcorrect", "asymmetry", "sem_asymmetry")):  # fmt: skip
        pairs = zip(sweep[mean], sweep[err], strict=True)
        text[f"{label} ± SEM"] = [f"{fmt.signed(m)} ± {fmt.num(e, 2)}" for m, e in pairs]
    text["improvement over SIDDO"] = sweep["relative_improvement"].map(fmt.pct)
    text["teacher seeds with transfer"] = [
        f"{int(k)}/{int(n)}" for k, n in zip(sweep["n_transfer"], sweep["n_teachers"], strict=True)
    ]
    caption = (f"Agreement deltas against {AXIS_NAMES[axis]}: mean ± SEM over every paired "
               "(teacher seed, student seed); transfer = a supported or marginal verdict")  # fmt: skip
    return Table(f"sweep_{axis}", caption, text)


AXIS_NAMES = {"temperature": "temperature", "width": "student width"}


# ----------------------------------------------------------------------------- equal conditions


def equivalence_table(frame: pd.DataFrame, name: str) -> Table:
    """Per (teacher seed, alpha, width): the metric with the largest paired |A - B|, for a
    condition A and the condition B its registry entry says it equals (LS and RCD)."""
    entry = condition(name)
    a, b = entry.label, condition_label(entry.equals)
    rows = []
    keys = ["teacher_seed", "alpha", *AXES]
    for (seed, alpha, width, noise), group in frame.groupby(keys, dropna=False, sort=True):
        paired = group.loc[group["max_abs_paired_diff"].idxmax()]
        means = group.loc[group["abs_mean_diff"].idxmax()]
        rows.append([str(seed), fmt.condition_label("", alpha, math.nan, False, width, noise).strip(),
                     str(int(paired["n"])), fmt.metric_label(paired["metric"], arrow=False),
                     fmt.num(paired["max_abs_paired_diff"], 3),
                     fmt.metric_label(means["metric"], arrow=False),
                     fmt.num(means["abs_mean_diff"], 3)])  # fmt: skip
    headers = ["teacher seed", "setting", "n", "metric (paired)", f"largest |{a} − {b}|",
               "metric (means)", f"largest |mean {a} − mean {b}|"]  # fmt: skip
    caption = (f"{entry.equals_note}: the largest difference over every metric, on a paired "
               "run and between the means")  # fmt: skip
    return Table(f"{name}_vs_{entry.equals}", caption, pd.DataFrame(rows, columns=headers))


# ----------------------------------------------------------------------------- targeted


def targeted_table(frame: pd.DataFrame, options) -> Table:
    """Rows = teachers and conditions, columns = mean ± SEM count per completion."""
    completions = options.targeted_completions
    keys = _row_keys(frame)
    order = sorted(range(len(frame)), key=lambda i: (frame["teacher_seed"].iat[i],
                                                     _teacher_first(keys[i])))  # fmt: skip
    rows = []
    for i in order:
        cells = [f"{fmt.num(frame[f'{c}_mean'].iat[i])} ± {fmt.num(frame[f'{c}_sem'].iat[i], 2)}"
                 for c in completions]  # fmt: skip
        rows.append([str(frame["teacher_seed"].iat[i]), _label(keys[i], True),
                     str(int(frame["n"].iat[i])), *cells])  # fmt: skip
    prompt = options.targeted_prompt
    headers = ["teacher seed", "model", "n", *(f'"{prompt}" → "{c}"' for c in completions)]
    caption = (f'Targeted error transfer: "{prompt}" prompts in the clean test text completed '
               "(greedy) with each character, mean ± SEM over runs")  # fmt: skip
    return Table("targeted", caption, pd.DataFrame(rows, columns=headers))


def _teacher_first(key: tuple) -> tuple:
    return (0,) if key[0] == "teacher" else (1, *_condition_sort(key))


# ----------------------------------------------------------------------------- teacher regime

TEACHER_TRANSFER_COLUMNS = ["teacher_seed", "train_loss", "train_accuracy", "test_accuracy",
                            "condition", "alpha", "temperature", "width", "teacher_label_noise",
                            "n", "delta_correct", "delta_incorrect", "relative_improvement",
                            "verdict"]  # fmt: skip


def teacher_transfer_frame(teachers: pd.DataFrame, analysis: Analysis) -> pd.DataFrame:
    """Each teacher's train loss beside the transfer its KD settings produced (the
    teacher-regime question: does a teacher with a higher train loss transfer more?)."""
    verdicts = analysis.verdicts_frame()
    # the regime question is about one treatment: KD where present
    verdicts = verdicts[verdicts["condition"] == first_treatment(analysis)]
    if verdicts.empty or teachers.empty:
        return pd.DataFrame(columns=TEACHER_TRANSFER_COLUMNS)
    own = with_teacher_noise(teachers)[[*TEACHER, "train_loss", "train_accuracy", "test_accuracy"]]
    frame = own.merge(verdicts, on=TEACHER, how="inner")
    order = ["teacher_seed", "teacher_label_noise", "width", "alpha"]
    return frame[TEACHER_TRANSFER_COLUMNS].sort_values(order)


def teacher_transfer_table(frame: pd.DataFrame) -> Table:
    beside = {}
    if "audit" in frame:  # several audits' teachers side by side (the teacher regimes)
        beside = {"audit": frame["audit"], "teacher training": frame["teacher_training"]}
    text = pd.DataFrame(
        {
            **beside,
            "teacher seed": frame["teacher_seed"].map(str),
            "teacher train loss": frame["train_loss"].map(fmt.num),
            "teacher test accuracy": frame["test_accuracy"].map(fmt.num),
            "setting": _setting_labels(frame),
            "n": frame["n"].map(str),
            "Δcorrect": frame["delta_correct"].map(fmt.signed),
            "Δincorrect": frame["delta_incorrect"].map(fmt.signed),
            "improvement over SIDDO": frame["relative_improvement"].map(fmt.pct),
            "verdict": frame["verdict"].str.replace("_", " "),
        }
    )  # fmt: skip
    caption = "Each teacher's train loss beside the transfer it produced"
    return Table("teacher_transfer", caption, text)


# ----------------------------------------------------------------------------- copied mistakes


def copied_table(frame: pd.DataFrame, name: str, rows: int) -> Table:
    """The first `rows` rows of a copied-mistakes table (stats.copied), rates as percentages."""
    head = frame.head(rows)
    text = pd.DataFrame(index=head.index)
    for column in head.columns:
        values = head[column]
        if column == "teacher_label_noise":  # shown in a teacher-error sweep only
            if (frame[column] != 0).any():
                text["label noise"] = values.map(lambda v: f"{v:g}")
        elif column in ("teacher_seed", "example", "label", "teacher_prediction", "n_examples"):
            text[column.replace("_", " ")] = values.map(lambda v: str(int(v)))
        elif column in ("label_name", "teacher_prediction_name"):
            text[column.replace("_", " ")] = values.map(str)
        elif column == "excess":
            text["excess"] = values.map(lambda v: fmt.signed(100 * v, 3) + " pts")
        elif column == "extra_copies":
            text["extra copies"] = values.map(lambda v: fmt.num(v, 3))
        else:
            text[column.replace("_", " ")] = values.map(fmt.pct)
    caption = ("Teacher mistakes copied most often (copy rate per condition)"
               if name == "copied_errors" else "Class pairs (true → teacher's wrong class)")  # fmt: skip
    return Table(name, f"{caption}: the first {len(head)} of {len(frame)}", text)


# ----------------------------------------------------------------------------- remedies


def remedies_table(frame: pd.DataFrame) -> Table:
    """stats.remedies.remedies_frame, formatted."""
    rows = []
    for r in frame.itertuples(index=False):
        rows.append([str(r.teacher_seed),
                     _label(_setting_key(r), True),
                     r.verdict.replace("_", " "), r.asymmetry, _count(r.negative_cells),
                     f"{r.of_verdict.replace('_', ' ')} / {r.of_asymmetry}",
                     _count(r.of_negative_cells),
                     f"{fmt.num(r.accuracy)} vs {fmt.num(r.of_accuracy)}",
                     f"{fmt.signed(r.accuracy_difference)} {_ci((r.accuracy_low, r.accuracy_high))}",
                     fmt.pval(r.p_less_accurate), fmt.signed(r.delta_correct_vs_of),
                     fmt.signed(r.delta_incorrect_vs_of),
                     "yes" if r.removed_negative_asymmetry else "no",
                     "yes" if r.loses_accuracy else "no"])  # fmt: skip
    headers = ["teacher seed", "remedy", "verdict", "asymmetry (robust)", "negative cells",
               "KD: verdict / asymmetry", "KD negative cells", "accuracy vs KD",
               "accuracy − KD (HL) [95% CI]", "p (less accurate)", "Δcorrect vs KD",
               "Δincorrect vs KD", "removed the negative asymmetry", "loses accuracy"]  # fmt: skip
    return Table("remedies", "Remedies beside KD", pd.DataFrame(rows, columns=headers))


def _count(x) -> str:
    return fmt.MISSING if fmt.is_missing(x) else str(int(x))


# ----------------------------------------------------------------------------- teacher-error sweep

# per scale of the asymmetry matrix: the cell's mean deltas against the control, with their
# 95% intervals, and its label
_CELL_COLUMNS = [
    f"{d}_{scale}{end}"
    for scale in ("raw", "headroom")
    for d in ("delta_correct", "delta_incorrect")
    for end in ("", "_low", "_high")
]
_CELL_COLUMNS += ["asymmetry_raw", "asymmetry_headroom"]
TEACHER_NOISE_COLUMNS = [*SETTING_KEYS, "n", "label_noise_fraction", "teacher_train_error_noisy",
                         "teacher_train_loss_noisy", "teacher_train_error", "teacher_test_accuracy",
                         "transfer", "transfer_low", "transfer_high", "transfer_p",
                         "relative_improvement", "verdict", *_CELL_COLUMNS, "accuracy",
                         "control_accuracy"]  # fmt: skip
_TEACHER_NOISE = {"label_noise_fraction": "label_noise_fraction",
                  "teacher_train_error_noisy": "noisy_train_accuracy",
                  "teacher_train_loss_noisy": "noisy_train_loss",
                  "teacher_train_error": "train_accuracy",
                  "teacher_test_accuracy": "test_accuracy"}  # fmt: skip


def teacher_noise_frame(teachers: pd.DataFrame, analysis: Analysis, control: str = "siddo"):
    """The teacher-error sweep, one row per setting of the first treatment (KD) per teacher
    seed, and pooled over teacher seeds (teacher_seed = stats.POOLED) when there are several:
    its teacher's label noise (realised fraction), train error and loss on its noisy labels,
    train error on the clean ones and test accuracy (pooled: means over the teachers);
    transfer, the Hodges-Lehmann estimate of agreement(KD) - agreement(control) in top-1
    predictions with its exact 95% interval and one-sided paired Wilcoxon p (the prediction
    disagreement test of the analysis); the asymmetry matrix's cells against the control
    (raw and headroom); and the treatment's and the control's mean test accuracy.
    `teachers`: teachers_frame's table."""
    treatment = first_treatment(analysis)
    settings = [s for s in (*analysis.settings, *analysis.pooled) if s.condition == treatment]
    own = _teacher_noise_lookup(teachers)
    rows = [_noise_row(s, own, control) for s in settings]
    frame = pd.DataFrame(rows, columns=TEACHER_NOISE_COLUMNS)
    order = ["teacher_seed", "temperature", "width", "alpha", "teacher_label_noise"]
    return frame.sort_values(order).reset_index(drop=True)


def _teacher_noise_lookup(teachers: pd.DataFrame) -> dict[tuple, dict]:
    """(teacher seed, noise) -> the teacher's sweep columns; (POOLED, noise): their means."""
    frame = with_teacher_noise(teachers)
    frame = frame.assign(**{c: frame.get(c, np.nan) for c in _TEACHER_NOISE.values()})
    values = frame[[*TEACHER, *dict.fromkeys(_TEACHER_NOISE.values())]]
    pooled = values.groupby(TEACHER[1], as_index=False).mean().assign(teacher_seed=POOLED)
    lookup = {}
    for row in pd.concat([values, pooled]).to_dict(orient="records"):
        lookup[(int(row["teacher_seed"]), float(row[TEACHER[1]]))] = {
            name: 1.0 - row[c] if name.startswith("teacher_train_error") else row[c]
            for name, c in _TEACHER_NOISE.items()
        }
    return lookup


def _noise_row(s, own: dict[tuple, dict], control: str) -> dict:
    comparison = s.comparison(control)
    agreement = comparison.test("prediction_disagreement") if comparison else None
    accuracy = comparison.test("accuracy") if comparison else None
    teacher = own.get((s.teacher_seed, s.teacher_label_noise), {})
    row = {**setting_keys(s), "n": s.n, **teacher, "relative_improvement": s.relative_improvement,
           "verdict": s.verdict}  # fmt: skip
    if agreement is not None:  # disagreement lower = agreement higher: the signs flip
        row.update(transfer=-agreement.estimate, transfer_low=-agreement.ci_high,
                   transfer_high=-agreement.ci_low, transfer_p=agreement.pvalue)  # fmt: skip
    if accuracy is not None:
        row.update(accuracy=accuracy.mean_treatment, control_accuracy=accuracy.mean_control)
    for cell in s.cells([control]):
        row.update(_cell_values(cell))
    return row


def _cell_values(cell) -> dict:
    values = {f"asymmetry_{cell.scale}": cell.label}
    for bucket in ("correct", "incorrect"):
        name = f"delta_{bucket}_{cell.scale}"
        low, high = getattr(cell, f"delta_{bucket}_ci")
        values.update({name: getattr(cell, f"delta_{bucket}"), f"{name}_low": low,
                       f"{name}_high": high})  # fmt: skip
    return values


def teacher_noise_table(frame: pd.DataFrame) -> Table:
    """teacher_noise_frame, formatted: one row per (teacher seed, setting, noise rate)."""
    text = pd.DataFrame(
        {
            "teacher seed": frame["teacher_seed"].map(lambda t: "pooled" if t == POOLED else str(t)),
            "setting": [_label((*k[:4], None), True) for k in _row_keys(frame)],
            "label noise": frame["teacher_label_noise"].map(lambda x: f"{x:g}"),
            "labels changed": frame["label_noise_fraction"].map(fmt.pct),
            "teacher train error (noisy labels)": frame["teacher_train_error_noisy"].map(fmt.pct),
            "teacher test accuracy": frame["teacher_test_accuracy"].map(fmt.num),
            "n": frame["n"].map(str),
            "transfer (HL) [95% CI]": [f"{fmt.signed(e)} {fmt.interval(lo, hi)}" for e, lo, hi in
                                       zip(frame["transfer"], frame["transfer_low"],
                                           frame["transfer_high"], strict=True)],
            "p": frame["transfer_p"].map(fmt.pval),
            "verdict": frame["verdict"].str.replace("_", " "),
            **{f"{label} ({scale})": _with_interval(frame, f"{d}_{scale}")
               for scale in ("raw", "headroom")
               for label, d in (("Δcorrect", "delta_correct"), ("Δincorrect", "delta_incorrect"))},
            "asymmetry (raw / headroom)": [f"{r} / {h}" for r, h in
                                           zip(frame["asymmetry_raw"], frame["asymmetry_headroom"],
                                               strict=True)],
            "KD accuracy": frame["accuracy"].map(fmt.num),
            "SIDDO accuracy": frame["control_accuracy"].map(fmt.num),
        }
    )  # fmt: skip
    caption = ("Teacher-error sweep: each teacher trained with a share of its training labels "
               "replaced at random (students see clean labels); transfer = agreement(KD) − "
               "agreement(SIDDO) in top-1 predictions (one-sided paired Wilcoxon p); Δcorrect and "
               "Δincorrect against SIDDO, mean [95% CI] over paired seeds")  # fmt: skip
    return Table("teacher_noise", caption, text)


def _with_interval(frame: pd.DataFrame, column: str) -> list[str]:
    return [f"{fmt.signed(m)} {fmt.interval(lo, hi)}" for m, lo, hi in
            zip(frame[column], frame[f"{column}_low"], frame[f"{column}_high"], strict=True)]  # fmt: skip
