"""summary.json: the verdicts and per-condition metric means, machine-readable."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pandas as pd

from kdaudit import __version__
from kdaudit.stats import SETTING_KEYS, Analysis

SETTING_FIELDS = [*SETTING_KEYS, "verdict", "asymmetry", "delta_correct", "delta_incorrect"]
SETTING_FIELDS += ["best_control", "n", "n_significant", "relative_improvement", "asymmetry_p"]
SETTING_FIELDS += ["note"]


def summary_json(
    analysis: Analysis,
    summary: pd.DataFrame,
    counts: dict[tuple, int],
    teachers: pd.DataFrame,
    title: str,
    meta: dict | None,
) -> str:
    data = {
        "title": title,
        "kdaudit_version": __version__,
        "meta": meta or {},
        "options": asdict(analysis.options),
        "settings": analysis.verdicts_frame()[SETTING_FIELDS].to_dict(orient="records"),
        "conditions": _conditions(summary, counts),
        "teachers": teachers.to_dict(orient="records"),
    }
    return (
        json.dumps(_clean(data), indent=2, allow_nan=False, ensure_ascii=False, default=str) + "\n"
    )


def _conditions(summary: pd.DataFrame, counts: dict[tuple, int]) -> list[dict]:
    out = []
    for (seed, condition, alpha, temperature, width), group in summary.groupby(
        list(SETTING_KEYS), dropna=False, sort=True
    ):
        key = (int(seed), condition, _none(alpha), _none(temperature), _none(width))
        means = dict(zip(group["metric"], group["mean"], strict=True))
        out.append(
            dict(
                teacher_seed=seed,
                condition=condition,
                alpha=alpha,
                temperature=temperature,
                width=width,
                n=counts.get(key, 0),
                means=means,
            )
        )
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
