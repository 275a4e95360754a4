"""Which of the teacher's mistakes each condition's students copied, from saved logits: the
input of the report's copied-mistakes tables, as kdaudit.store.copied gives it for a run
directory (one row per teacher-incorrect example and condition key, with its copy rate).

A language model's test set can hold millions of positions; past MAX_EXAMPLES teacher-
incorrect examples per teacher the per-example table would not fit in a report, so it is
left out with a note rather than cut silently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kdaudit.compare.files import TopkFile, open_logits
from kdaudit.compare.manifest import Manifest, ModelRow
from kdaudit.metrics.streaming import top1_predictions
from kdaudit.stats.copied import COPIED_COLUMNS, copy_rates

MAX_EXAMPLES = 200_000  # teacher-incorrect examples per teacher


def copied_predictions(spec: Manifest, labels, chunk_size: int) -> tuple[pd.DataFrame | None, str]:
    """The copy rates per teacher-incorrect example and condition key (COPIED_COLUMNS), and a
    note ("" when complete); None when a teacher has more than MAX_EXAMPLES mistakes."""
    flat = np.asarray(labels).reshape(-1)
    frames = []
    for teacher in spec.teachers:
        teacher_pred = _top1(teacher, labels, chunk_size)
        wrong = np.flatnonzero(teacher_pred != flat)
        if wrong.size > MAX_EXAMPLES:
            return None, (f"copied-mistakes tables left out: teacher seed {teacher.seed} has "
                          f"{wrong.size:,} teacher-incorrect examples, more than "
                          f"{MAX_EXAMPLES:,} rows a report can show")  # fmt: skip
        hits: dict[tuple, list[np.ndarray]] = {}
        for row in (s for s in spec.students if s.teacher_seed == teacher.seed):
            pred = _top1(row, labels, chunk_size)
            key = (row.role, row.alpha, row.temperature)
            hits.setdefault(key, []).append(pred[wrong] == teacher_pred[wrong])
        for (condition, alpha, temperature), h in hits.items():
            keys = dict(teacher_seed=teacher.seed, condition=condition, alpha=alpha,
                        temperature=temperature, width=None)  # fmt: skip
            frames.append(copy_rates(keys, wrong, flat, teacher_pred, h))
    if not frames:
        return pd.DataFrame(columns=COPIED_COLUMNS), ""
    return pd.concat(frames, ignore_index=True)[COPIED_COLUMNS], ""


def _top1(row: ModelRow, labels, chunk_size: int) -> np.ndarray:
    array = open_logits(row.path)
    try:
        source = array.as_input() if isinstance(array, TopkFile) else array
        return top1_predictions(source, labels, chunk_size=chunk_size)
    finally:
        array.close()
