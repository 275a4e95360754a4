"""Stored runs as tidy tables: one row per run per metric (students), one row per teacher."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdaudit.protocol import Grid, expand
from kdaudit.stats import SETTING_KEYS, with_axes
from kdaudit.store import STUDENTS_TEST_LOGITS, RunStore
from kdaudit.store.targeted import completion_counts, prompt_rows

# width: the student's width as a fraction of the teacher's (capacity grids; NaN elsewhere)
KEYS = ["run_id", "teacher_seed", "student_seed", "condition", "alpha", "temperature", "width"]
TEACHER_COLUMNS = ["teacher_seed", "run_id", "train_loss", "train_accuracy", "test_loss",
                   "test_accuracy"]  # fmt: skip
# A grid's runs and teachers add the teacher's label-noise rate (the teacher-error sweep; 0.0
# elsewhere); a table without it (kdaudit.compare's) reads as clean teachers (stats.AXES).
GRID_KEYS = [*KEYS, "teacher_label_noise"]
# a noisy teacher's record (kdaudit.engine.teachers.label_noise_record): the share of its
# training labels changed, and its train accuracy and loss on them (a clean teacher: 0, and
# its train accuracy and loss)
NOISE_COLUMNS = ["label_noise_fraction", "noisy_train_accuracy", "noisy_train_loss"]


def load_runs(out: str | Path, grid: Grid | None = None) -> pd.DataFrame:
    """Tidy rows (GRID_KEYS..., metric, value) for every complete student run of the grid."""
    store = RunStore(out)
    grid = grid or expand(store.load_experiment())
    rows = []
    for spec in grid.students:
        if not _intact(store, spec.run_id):
            continue
        for metric, value in _student_metrics(store.record(spec.run_id)).items():
            rows.append([*_keys(spec), metric, value])
    frame = pd.DataFrame(rows, columns=[*GRID_KEYS, "metric", "value"])
    return _typed(frame)


def _keys(spec) -> list:
    """A run's GRID_KEYS values."""
    return [spec.run_id, spec.teacher_seed, spec.student_seed, spec.condition, spec.alpha,
            spec.temperature, spec.width, spec.label_noise or 0.0]  # fmt: skip


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    floats = ["alpha", "temperature", "width", "teacher_label_noise"]
    return frame.astype({**dict.fromkeys(floats, float), "value": float})


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
    """One row per complete teacher: train/test loss and accuracy (on clean labels), and for
    a noisy teacher (the teacher-error sweep) its NOISE_COLUMNS."""
    store = RunStore(out)
    grid = grid or expand(store.load_experiment())
    rows = [_teacher_row(t, store.record(t.run_id)) for t in grid.teachers
            if _intact(store, t.run_id)]  # fmt: skip
    # a metric stored as null (unknown: a teacher trained by your own loop) reads as NaN
    columns = [TEACHER_COLUMNS[0], "teacher_label_noise", *TEACHER_COLUMNS[1:], *NOISE_COLUMNS]
    floats = [c for c in columns if c not in ("teacher_seed", "run_id")]
    return pd.DataFrame(rows, columns=columns).astype(dict.fromkeys(floats, float))


def _teacher_row(spec, record: dict) -> dict:
    metrics = record["metrics"]
    # a clean teacher's labels are its noisy labels: the same train accuracy and loss
    noise = record.get("label_noise") or {
        "fraction": 0.0,
        "noisy_train_accuracy": metrics.get("train_accuracy"),
        "noisy_train_loss": metrics.get("train_loss"),
    }
    return {"teacher_seed": spec.teacher_seed, "teacher_label_noise": spec.label_noise or 0.0,
            "run_id": spec.run_id, **metrics, "label_noise_fraction": noise["fraction"],
            "noisy_train_accuracy": noise.get("noisy_train_accuracy"),
            "noisy_train_loss": noise.get("noisy_train_loss")}  # fmt: skip


def accuracy_by_condition(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, SEM and n of test accuracy per setting (SETTING_KEYS)."""
    acc = with_axes(runs[runs.metric == "accuracy"])
    keys = list(SETTING_KEYS)
    grouped = acc.groupby(keys, dropna=False).value
    return grouped.agg(mean="mean", sem="sem", n="count").reset_index()


def targeted_counts(out: str | Path, grid: Grid, tokens, vocab: str, prompt: str,
                    completions: tuple[str, ...]) -> pd.DataFrame:  # fmt: skip
    """Greedy completions of `prompt` in the students' test text (`tokens`, indices into
    `vocab`), per complete run, teachers included: rows (KEYS..., completion, count), read
    from stored test logits. A teacher trained on other data (protocol.teacher_data) stored
    its logits on the students' text too; one stored before that is left out."""
    store = RunStore(out)
    rows_at = prompt_rows(tokens, vocab, prompt)
    rows = []
    for spec in [*grid.teachers, *grid.students]:
        logits = students_test_logits(store, spec)
        if logits is None:
            continue
        counts = completion_counts(logits, rows_at, vocab, completions)
        rows += [[*_keys(spec), c, n] for c, n in counts.items()]
    return pd.DataFrame(rows, columns=[*GRID_KEYS, "completion", "count"])


def students_test_logits(store: RunStore, spec):
    """An intact run's test logits on the students' test data, or None (a damaged run is
    left out, as in load_runs)."""
    if not _intact(store, spec.run_id):
        return None
    if spec.is_teacher and spec.students_data is not None:
        if not store.has_array(spec.run_id, STUDENTS_TEST_LOGITS):
            return None
        return store.array(spec.run_id, STUDENTS_TEST_LOGITS)
    return store.array(spec.run_id, "test_logits")


def targeted_transfer(out: str | Path, cfg, grid: Grid, data_dir=None) -> pd.DataFrame | None:
    """targeted_counts for a text grid whose teachers trained on other data than their
    students (protocol.teacher_data, the planted error); None for any other grid."""
    from kdaudit.data import load_data

    if cfg.protocol.teacher_data is None:
        return None
    data = load_data(cfg.data, Path(data_dir) if data_dir else None)
    if not hasattr(data, "vocab"):  # character text only: prompts are strings
        return None
    options = cfg.analysis
    tokens = data.test_tokens.cpu().numpy()
    return targeted_counts(out, grid, tokens, data.vocab, options.targeted_prompt,
                           options.targeted_completions)  # fmt: skip
