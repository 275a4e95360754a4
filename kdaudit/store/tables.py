"""Stored runs as tidy tables: one row per run per metric (students), one row per teacher."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdaudit.protocol import Grid, expand
from kdaudit.stats import with_width
from kdaudit.store import STUDENTS_TEST_LOGITS, RunStore
from kdaudit.store.targeted import completion_counts, prompt_rows

# width: the student's width as a fraction of the teacher's (capacity grids; NaN elsewhere)
KEYS = ["run_id", "teacher_seed", "student_seed", "condition", "alpha", "temperature", "width"]
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
                spec.alpha, spec.temperature, spec.width]  # fmt: skip
        for metric, value in _student_metrics(store.record(spec.run_id)).items():
            rows.append([*keys, metric, value])
    frame = pd.DataFrame(rows, columns=[*KEYS, "metric", "value"])
    return frame.astype({"alpha": float, "temperature": float, "width": float, "value": float})


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
    # a metric stored as null (unknown: a teacher trained by your own loop) reads as NaN
    return pd.DataFrame(rows, columns=TEACHER_COLUMNS).astype(
        {c: float for c in TEACHER_COLUMNS[2:]}
    )


def accuracy_by_condition(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, SEM and n of test accuracy per (teacher seed, condition, alpha, T, width)."""
    acc = with_width(runs[runs.metric == "accuracy"])
    keys = ["teacher_seed", "condition", "alpha", "temperature", "width"]
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
        keys = [spec.run_id, spec.teacher_seed, spec.student_seed, spec.condition, spec.alpha,
                spec.temperature, spec.width]  # fmt: skip
        rows += [[*keys, c, n] for c, n in counts.items()]
    return pd.DataFrame(rows, columns=[*KEYS, "completion", "count"])


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
