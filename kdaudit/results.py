"""Stored runs as tidy tables: one row per run per metric (students), one row per teacher."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdaudit.protocol import Grid, expand
from kdaudit.store import RunStore

KEYS = ["run_id", "teacher_seed", "student_seed", "condition", "alpha", "temperature"]
TEACHER_COLUMNS = ["teacher_seed", "run_id", "train_loss", "train_accuracy", "test_loss",
                   "test_accuracy"]  # fmt: skip


def load_runs(out: str | Path, grid: Grid | None = None) -> pd.DataFrame:
    """Tidy rows (KEYS..., metric, value) for every complete student run of the grid."""
    store = RunStore(out)
    grid = grid or expand(store.load_experiment())
    rows = []
    for spec in grid.students:
        if not _intact(store, spec.run_id):
            continue
        keys = [spec.run_id, spec.teacher_seed, spec.student_seed, spec.condition,
                spec.alpha, spec.temperature]  # fmt: skip
        for metric, value in _student_metrics(store.record(spec.run_id)).items():
            rows.append([*keys, metric, value])
    frame = pd.DataFrame(rows, columns=[*KEYS, "metric", "value"])
    return frame.astype({"alpha": float, "temperature": float, "value": float})


def _intact(store: RunStore, run_id: str) -> bool:
    """Complete and undamaged: a damaged run (left by a crash or a bad disk, not yet moved
    aside by the next `kdaudit run`) is left out of the analysis, not read half-written."""
    return store.is_complete(run_id) and store.verify(run_id) is None


def _student_metrics(record: dict) -> dict[str, float]:
    # The similarity block carries the run's own test accuracy and loss too.
    sim = {k: (float("nan") if v is None else v) for k, v in record["similarity"].items()}
    return {**sim, "train_accuracy": record["metrics"]["train_accuracy"],
            "train_loss": record["metrics"]["train_loss"]}  # fmt: skip


def load_teachers(out: str | Path, grid: Grid | None = None) -> pd.DataFrame:
    """One row per complete teacher: train/test loss and accuracy."""
    store = RunStore(out)
    grid = grid or expand(store.load_experiment())
    rows = [
        {"teacher_seed": t.teacher_seed, "run_id": t.run_id, **store.record(t.run_id)["metrics"]}
        for t in grid.teachers
        if _intact(store, t.run_id)
    ]
    return pd.DataFrame(rows, columns=TEACHER_COLUMNS)


def accuracy_by_condition(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, SEM and n of test accuracy per (teacher seed, condition, alpha, T)."""
    acc = runs[runs.metric == "accuracy"]
    keys = ["teacher_seed", "condition", "alpha", "temperature"]
    grouped = acc.groupby(keys, dropna=False).value
    return grouped.agg(mean="mean", sem="sem", n="count").reset_index()
