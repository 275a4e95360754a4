"""The evidence behind an asymmetry claim: which of the teacher's mistakes the treatment's
students copied more often than the controls' (input: kdaudit.store.copied's long table).

Per teacher-incorrect test example, one copy-rate column per condition key (the share of
that condition's runs that predicted the teacher's wrong class), and
    excess = (highest copy rate of any treatment setting) - (highest of any control),
how much more often the most-copying treatment setting copied the mistake than the
most-copying control. The same per class pair (true class -> teacher's wrong class), with
each rate averaged over the pair's examples, sorted by extra_copies = excess x n_examples
(about how many more of the pair's mistakes the treatment copied than the control).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kdaudit.conditions import is_treatment, order

# teacher_label_noise: one teacher of a teacher-error sweep (absent: one teacher per seed)
KEYS = ["teacher_seed", "teacher_label_noise", "example", "label", "teacher_prediction"]
PAIR_KEYS = ["teacher_seed", "teacher_label_noise", "label", "teacher_prediction"]
NAMES = ["label_name", "teacher_prediction_name"]  # when the data names its labels
DERIVED = ("treatment_max", "control_max", "excess")


# The input of copied_errors: one row per teacher-incorrect example and condition key, with
# the share of that condition's runs that predicted the teacher's wrong class.
COPIED_COLUMNS = ["teacher_seed", "example", "label", "teacher_prediction", "condition"]
COPIED_COLUMNS += ["alpha", "temperature", "width", "n_runs", "copy_rate"]
# a grid's (kdaudit.store.copied): one teacher per (seed, label noise), the teacher-error sweep
GRID_COPIED_COLUMNS = [COPIED_COLUMNS[0], "teacher_label_noise", *COPIED_COLUMNS[1:]]


def copy_rates(keys: dict, wrong, labels, teacher_pred, hits) -> pd.DataFrame:
    """The rows of one teacher and one condition key (`keys`: teacher_seed, condition,
    alpha, temperature, width, ...; None as NaN): per teacher-incorrect example (`wrong`
    indices), its label, the teacher's prediction and the share of the runs (`hits`: one
    bool array per run over `wrong`) that predicted the teacher's wrong class."""
    keys = {k: np.nan if v is None else v for k, v in keys.items()}
    return pd.DataFrame({**keys, "example": wrong, "label": labels[wrong],
                         "teacher_prediction": teacher_pred[wrong], "n_runs": len(hits),
                         "copy_rate": np.mean(hits, axis=0)})  # fmt: skip


def rate_column(condition: str, alpha, temperature, width, show_t: bool) -> str:
    """'kd a=0.9', 'kd a=0.9 T=2', 'siddo', 'rcd a=0.5 w=0.3'."""
    parts = [condition]
    if not _missing(alpha):
        parts.append(f"a={alpha:g}")
    if show_t and not _missing(temperature):
        parts.append(f"T={temperature:g}")
    if not _missing(width):
        parts.append(f"w={width:g}")
    return " ".join(parts)


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def copied_errors(copied: pd.DataFrame) -> pd.DataFrame:
    """One row per (teacher seed, teacher-incorrect example): label, teacher's prediction,
    one copy-rate column per condition key (treatments first), treatment_max, control_max
    and excess; sorted by excess, most copied first."""
    if copied.empty:
        return pd.DataFrame(columns=[*KEYS, "treatment_max", "control_max", "excess"])
    show_t = copied.loc[copied["condition"].map(is_treatment), "temperature"].nunique() > 1
    keys = [k for k in (*KEYS, *NAMES) if k in copied.columns]
    keyed = copied.assign(column=[
        rate_column(c, a, t, w, show_t)
        for c, a, t, w in copied[["condition", "alpha", "temperature", "width"]].itertuples(
            index=False)
    ])  # fmt: skip
    wide = keyed.pivot_table(index=keys, columns="column", values="copy_rate", sort=False)
    columns = _ordered_columns(keyed)
    wide = wide[columns]
    wide = _with_excess(wide, columns).reset_index()
    wide.columns.name = None
    return wide.sort_values(["excess", "treatment_max", "teacher_seed", "example"],
                            ascending=[False, False, True, True],
                            kind="stable").reset_index(drop=True)  # fmt: skip


def copied_class_pairs(errors: pd.DataFrame) -> pd.DataFrame:
    """Per (teacher seed, true class, teacher's wrong class): the number of such examples and
    each copy-rate column averaged over them, sorted by extra_copies."""
    if errors.empty:
        return pd.DataFrame(columns=[*PAIR_KEYS, "n_examples", "excess"])
    rates = [c for c in errors.columns if c not in (*KEYS, *NAMES, *DERIVED)]
    keys = [k for k in (*PAIR_KEYS, *NAMES) if k in errors.columns]
    grouped = errors.groupby(keys, sort=True)
    pairs = grouped[rates].mean()
    pairs.insert(0, "n_examples", grouped.size())
    pairs = _with_excess(pairs, rates)
    pairs["extra_copies"] = pairs["excess"] * pairs["n_examples"]
    pairs = pairs.reset_index()
    return pairs.sort_values(["extra_copies", "n_examples"], ascending=[False, False],
                             kind="stable").reset_index(drop=True)  # fmt: skip


def _with_excess(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """treatment_max, control_max and excess over the copy-rate `columns` of each row."""
    treatments = [c for c in columns if is_treatment(c.split()[0])]
    controls = [c for c in columns if c not in treatments]
    frame = frame.assign(
        treatment_max=frame[treatments].max(axis=1) if treatments else math.nan,
        control_max=frame[controls].max(axis=1) if controls else math.nan,
    )
    return frame.assign(excess=frame["treatment_max"] - frame["control_max"])


def _ordered_columns(keyed: pd.DataFrame) -> list[str]:
    """Treatments first, then controls, each in registry order, then by alpha, T, width."""
    keys = keyed.drop_duplicates("column")

    def sort_key(row):
        treatment = 0 if is_treatment(row.condition) else 1
        nums = [
            (-1.0 if _missing(v) else float(v)) for v in (row.alpha, row.temperature, row.width)
        ]
        return (treatment, order(row.condition), row.condition, *nums)

    return [row.column for row in sorted(keys.itertuples(index=False), key=sort_key)]
