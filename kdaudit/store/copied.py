"""Which of the teacher's mistakes each run copied, read from stored test logits.

A run *copies* a teacher mistake on a test example when the teacher's top-1 class is wrong
and the run predicts that same wrong class. `copied_predictions` gives, per teacher seed and
teacher-incorrect test example, the share of each condition's runs (one per student seed)
that copied it; kdaudit.stats.copied turns that into the report's evidence tables.

The test labels come from the data once and are kept in the run directory
(DIR/test_labels.npy), so later reports need no data directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from kdaudit.protocol import Grid
from kdaudit.stats.copied import GRID_COPIED_COLUMNS, copy_rates
from kdaudit.store import RunStore, atomic_save_array
from kdaudit.store.tables import students_test_logits

TEST_LABELS = "test_labels.npy"
LABEL_NAMES = "label_names.json"  # beside it, when the data names its labels
VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t"}


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
    names = label_names(data)
    if names is not None:
        (Path(out) / LABEL_NAMES).write_text(json.dumps(names, ensure_ascii=False))
    atomic_save_array(path, labels)
    return labels


def label_names(data) -> list[str] | None:
    """The names of the label ids: a text dataset's characters (whitespace made visible),
    else the dataset's class names; None when it has neither."""
    vocab = getattr(data, "vocab", None)
    if isinstance(vocab, str):
        return [VISIBLE.get(c, c) for c in vocab]
    names = getattr(data, "class_names", None)
    return list(names) if names else None


def stored_label_names(out: str | Path) -> list[str] | None:
    path = Path(out) / LABEL_NAMES
    return json.loads(path.read_text()) if path.is_file() else None


def copied_predictions(
    out: str | Path, grid: Grid, labels: np.ndarray, names: list[str] | None = None
) -> pd.DataFrame:
    """Per teacher (seed, label noise), teacher-incorrect test example and condition key
    (condition, alpha, T, width): how many complete runs there are and the share that
    predicted the teacher's wrong class (GRID_COPIED_COLUMNS; with `names`, also label_name and
    teacher_prediction_name)."""
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
            keys = dict(teacher_seed=teacher.teacher_seed,
                        teacher_label_noise=teacher.label_noise or 0.0, condition=condition,
                        alpha=alpha, temperature=temperature, width=width)  # fmt: skip
            frames.append(copy_rates(keys, wrong, labels, teacher_pred, hits))
    if not frames:
        return pd.DataFrame(columns=GRID_COPIED_COLUMNS)
    copied = pd.concat(frames, ignore_index=True)[GRID_COPIED_COLUMNS]
    if names is None:
        return copied
    lookup = np.asarray(names, dtype=object)
    return copied.assign(label_name=lookup[copied["label"].to_numpy()],
                         teacher_prediction_name=lookup[copied["teacher_prediction"].to_numpy()])  # fmt: skip
