"""Which of the teacher's mistakes each run copied, read from stored test logits.

A run *copies* a teacher mistake on a test example when the teacher's top-1 class is wrong
and the run predicts that same wrong class. `copied_predictions` gives, per teacher seed and
teacher-incorrect test example, the share of each condition's runs (one per student seed)
that copied it; kdaudit.stats.copied turns that into the report's evidence tables.

The test labels come from the data once and are kept in the run directory
(DIR/test_labels.npy), so later reports need no data directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kdaudit.protocol import Grid
from kdaudit.store import RunStore, atomic_save_array
from kdaudit.store.tables import students_test_logits

TEST_LABELS = "test_labels.npy"
COPIED_COLUMNS = ["teacher_seed", "example", "label", "teacher_prediction", "condition"]
COPIED_COLUMNS += ["alpha", "temperature", "width", "n_runs", "copy_rate"]


def load_test_labels(out: str | Path, cfg, data_dir=None) -> np.ndarray | None:
    """The students' test labels: DIR/test_labels.npy, else from the data (then kept there);
    None when neither is available (the data directory missing)."""
    path = Path(out) / TEST_LABELS
    if path.is_file():
        return np.load(path)
    from kdaudit.data import load_data
    from kdaudit.data.files import DatasetMissing

    try:
        data = load_data(cfg.data, Path(data_dir) if data_dir else None)
    except (DatasetMissing, FileNotFoundError):
        return None
    labels = data.labels("test").cpu().numpy().astype(np.int64).reshape(-1)
    atomic_save_array(path, labels)
    return labels


def copied_predictions(out: str | Path, grid: Grid, labels: np.ndarray) -> pd.DataFrame:
    """Per teacher seed, teacher-incorrect test example and condition key (condition, alpha,
    T, width): how many complete runs there are and the share that predicted the teacher's
    wrong class (COPIED_COLUMNS)."""
    store = RunStore(out)
    labels = np.asarray(labels).reshape(-1)
    frames = []
    for teacher in grid.teachers:
        logits = students_test_logits(store, teacher)
        if logits is None:
            continue
        teacher_pred = np.asarray(logits).reshape(-1, logits.shape[-1]).argmax(-1)
        if teacher_pred.size != labels.size:
            continue  # stored before the labels changed: nothing to align
        wrong = np.flatnonzero(teacher_pred != labels)
        copies: dict[tuple, list[np.ndarray]] = {}
        for spec in grid.students:
            if spec.teacher_id != teacher.run_id:
                continue
            student = students_test_logits(store, spec)
            if student is None:
                continue
            pred = np.asarray(student).reshape(-1, student.shape[-1]).argmax(-1)
            key = (spec.condition, spec.alpha, spec.temperature, spec.width)
            copies.setdefault(key, []).append(pred[wrong] == teacher_pred[wrong])
        for (condition, alpha, temperature, width), hits in copies.items():
            frames.append(pd.DataFrame({
                "teacher_seed": teacher.teacher_seed, "example": wrong, "label": labels[wrong],
                "teacher_prediction": teacher_pred[wrong], "condition": condition,
                "alpha": _float(alpha), "temperature": _float(temperature),
                "width": _float(width), "n_runs": len(hits),
                "copy_rate": np.mean(hits, axis=0),
            }))  # fmt: skip
    if not frames:
        return pd.DataFrame(columns=COPIED_COLUMNS)
    return pd.concat(frames, ignore_index=True)[COPIED_COLUMNS]


def _float(x) -> float:
    return np.nan if x is None else float(x)
