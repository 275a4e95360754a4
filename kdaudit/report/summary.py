"""summary.json: the verdicts and per-condition metric means, machine-readable."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pandas as pd

from kdaudit import __version__
from kdaudit.stats import SETTING_KEYS, Analysis, SettingResult

SETTING_FIELDS = [*SETTING_KEYS, "verdict", "asymmetry", "paper_asymmetry", "delta_correct"]
SETTING_FIELDS += ["delta_incorrect", "best_control", "n", "n_significant"]
SETTING_FIELDS += ["relative_improvement", "asymmetry_p", "seeds_needed", "asymmetry_why", "note"]
# summary.json's `tests`: one object per paired test (estimate and interval: treatment - control)
TEST_FIELDS = {"teacher_seed": "teacher_seed", "condition": "condition", "alpha": "alpha",
               "temperature": "temperature", "width": "width",
               "teacher_label_noise": "teacher_label_noise", "control": "control",
               "metric": "metric", "n": "n", "statistic": "statistic", "pvalue": "p",
               "p_adjusted": "p_adjusted", "significant": "significant",
               "effect_size": "effect_size", "estimate": "estimate", "ci_low": "ci_low",
               "ci_high": "ci_high", "seeds_needed": "seeds_needed"}  # fmt: skip


def summary_json(
    analysis: Analysis,
    summary: pd.DataFrame,
    counts: dict[tuple, int],
    teachers: pd.DataFrame,
    title: str,
    meta: dict | None,
) -> str:
    tests = analysis.tests_frame()[list(TEST_FIELDS)].rename(columns=TEST_FIELDS)
    data = {
        "title": title,
        "kdaudit_version": __version__,
        "meta": meta or {},
        "options": asdict(analysis.options),
        "settings": [_setting(s) for s in analysis.settings],
        "pooled": [_pooled(s) for s in analysis.pooled],
        "tests": tests.to_dict(orient="records"),
        "conditions": _conditions(summary, counts),
        "teachers": teachers.to_dict(orient="records"),
    }
    return (
        json.dumps(_clean(data), indent=2, allow_nan=False, ensure_ascii=False, default=str) + "\n"
    )


def _setting(s: SettingResult) -> dict:
    row = s.to_frame()[SETTING_FIELDS].to_dict(orient="records")[0]
    return {**row, "asymmetry_matrix": [c.to_dict() for c in s.matrix]}


def _pooled(s: SettingResult) -> dict:
    keys = ("condition", "alpha", "temperature", "width", "teacher_label_noise", "n", "verdict",
            "asymmetry", "asymmetry_why")  # fmt: skip
    row = {k: v for k, v in _setting(s).items() if k in (*keys, "asymmetry_matrix")}
    return {**row, "n_teachers": s.n_teachers, "verdicts": dict(s.teacher_verdicts or {})}


def _conditions(summary: pd.DataFrame, counts: dict[tuple, int]) -> list[dict]:
    out = []
    for values, group in summary.groupby(list(SETTING_KEYS), dropna=False, sort=True):
        seed, condition, *params = values  # alpha, temperature, then the grid axes
        key = (int(seed), condition, *(_none(p) for p in params))
        means = dict(zip(group["metric"], group["mean"], strict=True))
        row = dict(zip(SETTING_KEYS, values, strict=True))
        out.append(dict(row, n=counts.get(key, 0), means=means))
    return out


def _none(x):
    return None if isinstance(x, float) and math.isnan(x) else float(x)


def _clean(x):
    """JSON-safe: numpy scalars to Python, NaN and inf to null, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.generic,)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is pd.NA or x is pd.NaT:
        return None
    return x
