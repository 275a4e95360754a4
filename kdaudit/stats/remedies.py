"""Remedies beside the treatment they change (PROTOCOL section 10): did a remedy remove the
negative asymmetry of KD without losing accuracy against it?

Per setting of a remedy (a condition whose registry entry names `remedy_of`), beside the
same setting of what it changes (KD at the same teacher seed, alpha, T and grid axes):
- the transfer verdict and robust asymmetry label of each, and how many of their verdict
  controls' matrix cells (2 controls x 2 scales) are `negative`;
- accuracy: the means, the Hodges-Lehmann estimate of remedy - KD with its exact 95%
  interval, and the one-sided paired Wilcoxon p-values of each direction;
- the remedy's agreement gained over KD (raw) on the teacher's correct and incorrect test
  examples: below zero on the incorrect ones, it copies fewer of the teacher's mistakes;
- removed_negative_asymmetry: KD has a negative cell and the remedy none;
  loses_accuracy: the remedy is significantly less accurate than KD at the level.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kdaudit.conditions import CONDITIONS
from kdaudit.stats import (
    SETTING_KEYS,
    Analysis,
    SettingResult,
    same_setting,
    select_runs,
    setting_keys,
    wide_table,
    with_axes,
)
from kdaudit.stats.paired import paired_wilcoxon

REMEDY_COLUMNS = [*SETTING_KEYS, "remedy_of", "n", "verdict", "asymmetry", "negative_cells"]
REMEDY_COLUMNS += ["of_verdict", "of_asymmetry", "of_negative_cells", "accuracy"]
REMEDY_COLUMNS += ["of_accuracy", "accuracy_difference", "accuracy_low", "accuracy_high"]
REMEDY_COLUMNS += ["p_more_accurate", "p_less_accurate", "delta_correct_vs_of"]
REMEDY_COLUMNS += ["delta_incorrect_vs_of", "removed_negative_asymmetry", "loses_accuracy"]


def remedies_frame(runs: pd.DataFrame, analysis: Analysis) -> pd.DataFrame:
    """One row per remedy setting (REMEDY_COLUMNS); empty when the grid has no remedy."""
    runs = with_axes(runs)
    rows = []
    for s in analysis.settings:
        entry = CONDITIONS.get(s.condition) if s.condition in CONDITIONS else None
        if entry is None or entry.remedy_of is None:
            continue
        of = _same_setting(analysis, s, entry.remedy_of)
        rows.append(_row(runs, s, of, entry.remedy_of, analysis.options.alpha_level))
    return pd.DataFrame(rows, columns=REMEDY_COLUMNS)


def _same_setting(analysis: Analysis, s: SettingResult, condition: str) -> SettingResult | None:
    """`condition`'s setting at s's teacher seed, alpha, T and grid axes."""
    return next((o for o in analysis.settings if o.condition == condition
                 and o.teacher_seed == s.teacher_seed and same_setting(o, s)), None)  # fmt: skip


def _negative_cells(s: SettingResult | None) -> float:
    if s is None:
        return math.nan
    return float(sum(c.label == "negative" for c in s.cells(s.verdict_controls)))


def _row(runs, s: SettingResult, of: SettingResult | None, of_name: str, level: float) -> dict:
    row = dict(setting_keys(s), remedy_of=of_name, n=s.n, verdict=s.verdict, asymmetry=s.asymmetry,
               negative_cells=_negative_cells(s), of_verdict=of.verdict if of else "",
               of_asymmetry=of.asymmetry if of else "", of_negative_cells=_negative_cells(of))  # fmt: skip
    row.update(_accuracy(runs, s, of_name, level))
    raw = next((c for c in s.matrix if c.control == of_name and c.scale == "raw"), None)
    row["delta_correct_vs_of"] = raw.delta_correct if raw else math.nan
    row["delta_incorrect_vs_of"] = raw.delta_incorrect if raw else math.nan
    row["removed_negative_asymmetry"] = bool(
        row["of_negative_cells"] > 0 and row["negative_cells"] == 0
    )
    row["loses_accuracy"] = bool(row["p_less_accurate"] <= level)
    return row


def _accuracy(runs: pd.DataFrame, s: SettingResult, of_name: str, level: float) -> dict:
    """Paired accuracy of the remedy against the setting of what it changes."""
    key = setting_keys(s)
    accuracy = runs[runs["metric"] == "accuracy"]
    mine = wide_table(select_runs(accuracy, s.condition, key), s.condition)
    theirs = wide_table(select_runs(accuracy, of_name, key), of_name)
    nan = dict(accuracy=math.nan, of_accuracy=math.nan, accuracy_difference=math.nan,
               accuracy_low=math.nan, accuracy_high=math.nan, p_more_accurate=math.nan,
               p_less_accurate=math.nan)  # fmt: skip
    if "accuracy" not in mine or "accuracy" not in theirs:
        return nan
    pairs = pd.concat([mine["accuracy"], theirs["accuracy"]], axis=1, join="inner").dropna()
    if pairs.empty:
        return nan
    t, c = pairs.to_numpy(dtype=np.float64).T
    more = paired_wilcoxon(t, c, "higher", level=level)
    less = paired_wilcoxon(t, c, "lower", level=level)
    return dict(accuracy=more.mean_treatment, of_accuracy=more.mean_control,
                accuracy_difference=more.estimate, accuracy_low=more.ci_low,
                accuracy_high=more.ci_high, p_more_accurate=more.pvalue,
                p_less_accurate=less.pvalue)  # fmt: skip
