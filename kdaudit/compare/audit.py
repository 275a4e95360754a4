"""`kdaudit compare`: the audit of saved test logits, from manifest to report.

Writes into the output folder DIR:

- DIR/report/: the same report as `kdaudit report` writes;
- DIR/runs.csv: the tidy run table, one row per student per metric;
- DIR/manifest.resolved.csv: the manifest as read (absolute paths, parsed settings);
- DIR/metrics_cache.json: per-row metrics, reused while the files are unchanged.

When any file is a top-k file, every student is compared with its teacher through the top-k
view of both files (k: the smallest of the top-k files; full logits are cut to it), and the
result's notes and the report's header name the k and the metrics that view only
approximates ("top-k approx.", kdaudit.metrics.topk_approximate).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from kdaudit.compare.cache import MetricsCache
from kdaudit.compare.checks import Layout, check_controls, check_files
from kdaudit.compare.copied import copied_predictions
from kdaudit.compare.errors import CompareError
from kdaudit.compare.files import TopkFile, open_logits
from kdaudit.compare.manifest import Manifest, ModelRow, read_manifest
from kdaudit.config import AnalysisOptions
from kdaudit.metrics import (
    DEFAULT_CHUNK_SIZE,
    PROCRUSTES_MAX_CLASSES,
    TOPK_MARK,
    BadRows,
    InvalidTopK,
    accuracy_and_loss,
    functional_similarity_many,
    topk_approximate,
)
from kdaudit.metrics.topk import PROBLEMS
from kdaudit.report import About, write_report
from kdaudit.report.result import AuditResult
from kdaudit.stats import analyse
from kdaudit.store import code_version
from kdaudit.store.tables import KEYS, TEACHER_COLUMNS

CACHE_FILE = "metrics_cache.json"
# Students compared with their teacher in one pass (the teacher's chunks are read and sorted
# once per pass): at most this many files open at once, and at most this much memory for
# their K x K Procrustes sums when K <= procrustes_max_classes.
MAX_MODELS_PER_PASS = 16
PROCRUSTES_BYTES_PER_PASS = 256 << 20


CompareResult = AuditResult  # one result type for every audit


def compare(
    manifest: str | Path,
    out: str | Path | None = None,
    *,
    analysis: AnalysisOptions | None = None,
    procrustes_max_classes: int | None = PROCRUSTES_MAX_CLASSES,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    log: Callable[[str], None] | None = None,
) -> CompareResult:
    """Audit the models a manifest lists from their saved test logits.

    Computes every metric of each student against its teacher (and each teacher's own
    accuracy and loss), runs the paired tests and writes `out/report/` (default
    runs/<manifest name>). `log` receives one line per model and each warning. Raises
    CompareError for a manifest or files that cannot be audited.
    """
    log = log or (lambda line: None)
    spec = read_manifest(manifest)
    out = Path(out) if out is not None else Path("runs") / spec.path.stem
    layout = check_files(spec)
    notes = check_controls(spec) + _procrustes_note(layout.k, procrustes_max_classes)
    for note in notes:
        log(f"warning: {note}")
    settings = dict(procrustes_max_classes=procrustes_max_classes)
    if layout.topk is not None:  # absent otherwise: full-logit cache keys stay as they were
        settings["topk"] = layout.topk
    metrics = _all_metrics(spec, layout, MetricsCache(out / CACHE_FILE), settings, chunk_size, log)
    topk = _topk_notes(spec, layout, metrics)
    for note in topk:
        log(f"note: {note}")
    notes += topk
    runs, teachers = _runs_frame(spec, metrics), _teachers_frame(spec, metrics)
    copied, note = copied_predictions(spec, layout.labels, chunk_size)
    if note:
        log(f"note: {note}")
        notes.append(note)
    result = analyse(runs, analysis or AnalysisOptions())
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    _manifest_frame(spec).to_csv(out / "manifest.resolved.csv", index=False)
    report = write_report(
        out / "report",
        runs,
        teachers,
        result,
        title=f"kdaudit compare: {spec.path.stem}",
        meta=_meta(spec, layout, notes, metrics),
        copied=copied,
        about=About(
            num_classes=layout.k,
            approximate_metrics=_marked(spec, layout, metrics),
            trained_here=False,
        ),
    )
    return AuditResult(out, runs, teachers, result, report, notes=tuple(notes))


def _procrustes_note(k: int, limit: int | None) -> list[str]:
    if limit is None or k <= limit:
        return []
    gb = k * k * 8 / 1e9
    return [
        f"procrustes_distance not computed (NaN): K={k} > procrustes_max_classes={limit}; "
        f"an exact value needs a {k} x {k} float64 matrix ({gb:.1f} GB) and its SVD"
    ]


def _topk_notes(spec: Manifest, layout: Layout, metrics: dict[ModelRow, dict]) -> list[str]:
    """What a top-k view computed: its k, and which metrics it only approximates."""
    if layout.topk is None:
        return []
    k, v = layout.topk, layout.k
    full = len(spec.teachers) + len(spec.students) - layout.topk_files
    notes = [
        f"top-k inputs: every metric from the top-{k} view of each file (V={v}; "
        f"{layout.topk_files} top-k file(s), {full} full-logit file(s) cut to their top {k}); "
        "top-1 agreement, the correct/incorrect split, accuracy and VoI exact; "
        f"rank_disagreement and topk_overlap over the top {k}"
    ]
    marked = _marked(spec, layout, metrics)
    if marked:
        notes.append(
            f"{TOPK_MARK}: {', '.join(marked)} (the union of both models' top-{k} plus one "
            "tail bin; the loss where a label is outside a model's top-k)"
        )
    return notes


def _marked(spec: Manifest, layout: Layout, metrics: dict[ModelRow, dict]) -> tuple[str, ...]:
    students = [metrics[s] for s in spec.students]
    return topk_approximate(students, layout.topk, layout.k)


# ----------------------------------------------------------------------------- metrics


def _all_metrics(spec: Manifest, layout, cache, settings, chunk_size, log) -> dict[ModelRow, dict]:
    """Every row's metrics, from the cache or computed: teachers alone, students in passes."""
    rows = [*spec.teachers, *spec.students]
    keys = {row: _cache_key(cache, spec, row, settings) for row in rows}
    out = {row: cache.get(keys[row]) for row in rows}
    todo = [row for row in rows if out[row] is None]
    if len(todo) < len(rows):
        log(f"{len(rows) - len(todo)} of {len(rows)} models' metrics read from the cache")
    done = 0
    for batch in _passes(todo, layout.k, settings["procrustes_max_classes"]):
        start = time.perf_counter()
        results = _compute(batch, spec, layout, settings, chunk_size)
        for row, metrics in zip(batch, results, strict=True):
            cache.put(keys[row], metrics)
            out[row] = metrics
        done += len(batch)
        labels = (
            batch[0].label
            if len(batch) == 1
            else f"{len(batch)} students of teacher seed {batch[0].teacher_seed}"
        )
        log(f"[{done}/{len(todo)}] {labels}: {time.perf_counter() - start:.1f} s")
    return out


def _cache_key(cache: MetricsCache, spec: Manifest, row: ModelRow, settings: dict) -> str:
    if row.is_teacher:
        return cache.key([row.path, spec.labels], role="teacher")
    files = [spec.teacher_of(row).path, row.path, spec.labels]
    return cache.key(files, role="student", **settings)


def _passes(rows: list[ModelRow], k: int, procrustes_max_classes: int | None):
    """Teachers one by one; students grouped by teacher, `_pass_size` at a time."""
    for row in rows:
        if row.is_teacher:
            yield [row]
    size = _pass_size(k, procrustes_max_classes)
    by_teacher: dict[int, list[ModelRow]] = {}
    for row in rows:
        if not row.is_teacher:
            by_teacher.setdefault(row.teacher_seed, []).append(row)
    for students in by_teacher.values():
        for i in range(0, len(students), size):
            yield students[i : i + size]


def _pass_size(k: int, procrustes_max_classes: int | None) -> int:
    """Students per pass over the teacher: bounded by open files and Procrustes memory."""
    if procrustes_max_classes is not None and k > procrustes_max_classes:
        return MAX_MODELS_PER_PASS
    return max(1, min(MAX_MODELS_PER_PASS, PROCRUSTES_BYTES_PER_PASS // (8 * k * k)))


def _compute(batch: list[ModelRow], spec: Manifest, layout: Layout, settings, chunk_size):
    teacher = batch[0] if batch[0].is_teacher else spec.teacher_of(batch[0])
    arrays = [open_logits(teacher.path)]
    try:
        if batch[0].is_teacher:
            accuracy, loss = accuracy_and_loss(
                _input(arrays[0]), layout.labels, chunk_size=chunk_size
            )
            return [{"test_accuracy": accuracy, "test_loss": loss}]
        arrays += [open_logits(row.path) for row in batch]
        inputs = [_input(a) for a in arrays]
        return functional_similarity_many(
            inputs[0], inputs[1:], layout.labels, chunk_size=chunk_size, **settings
        )
    except BadRows as err:
        culprit = teacher if err.model is None else batch[err.model]
        index = tuple(int(i) for i in np.unravel_index(err.row, layout.shape[:-1]))
        what = (
            PROBLEMS[err.problem] if isinstance(err, InvalidTopK) else "logits contain NaN or inf"
        )
        raise CompareError(
            f"{culprit.path} ({culprit.where()}): {what}; the first bad row "
            f"is {err.row} of the flattened logits (index {index} of shape {layout.shape[:-1]})"
        ) from err
    finally:
        for array in arrays:
            array.close()


# ----------------------------------------------------------------------------- tables


def _input(array):
    return array.as_input() if isinstance(array, TopkFile) else array


def _runs_frame(spec: Manifest, metrics: dict[ModelRow, dict]) -> pd.DataFrame:
    """The tidy run table of kdaudit.store.tables: one row per student per metric."""
    rows = []
    for s in spec.students:
        # width: no capacity axis in a manifest (NaN, as in a grid without one)
        keys = [s.label, s.teacher_seed, s.seed, s.role, _nan(s.alpha), _nan(s.temperature),
                float("nan")]  # fmt: skip
        rows += [[*keys, metric, value] for metric, value in metrics[s].items()]
    frame = pd.DataFrame(rows, columns=[*KEYS, "metric", "value"])
    return frame.astype({"alpha": float, "temperature": float, "width": float, "value": float})


def _teachers_frame(spec: Manifest, metrics: dict[ModelRow, dict]) -> pd.DataFrame:
    """One row per teacher; train loss and accuracy are unknown from test logits: NaN."""
    rows = [
        {
            "teacher_seed": t.seed,
            "run_id": t.label,
            "train_loss": float("nan"),
            "train_accuracy": float("nan"),
            **metrics[t],
        }
        for t in spec.teachers
    ]
    return pd.DataFrame(rows, columns=TEACHER_COLUMNS)


def _manifest_frame(spec: Manifest) -> pd.DataFrame:
    rows = [dict(role="labels", path=str(spec.labels))]
    rows += [
        dict(
            role=r.role,
            alpha=r.alpha,
            temperature=r.temperature,
            seed=r.seed,
            teacher_seed=r.teacher_seed,
            path=str(r.path),
        )
        for r in (*spec.teachers, *spec.students)
    ]
    columns = ["role", "alpha", "temperature", "seed", "teacher_seed", "path"]
    return pd.DataFrame(rows, columns=columns).astype({"seed": "Int64", "teacher_seed": "Int64"})


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def _meta(spec: Manifest, layout: Layout, notes: list[str], metrics) -> dict:
    meta = {
        "manifest": str(spec.path),
        "models": f"{len(spec.teachers)} teacher(s), {len(spec.students)} students",
        "examples": f"N={layout.n} positions (logits shape {layout.shape}), K={layout.k}",
        "train metrics": "unknown (test logits only)",
        **code_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    if layout.topk is not None:
        meta["top-k"] = f"k={layout.topk} of V={layout.k} ({layout.topk_files} top-k file(s))"
        meta[TOPK_MARK] = ", ".join(_marked(spec, layout, metrics)) or "none"
    if notes:
        meta["notes"] = "; ".join(notes)
    return meta
