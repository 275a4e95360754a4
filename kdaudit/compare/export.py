"""`kdaudit export`: a run directory's stored test logits as a `kdaudit compare` manifest,
so that any audit can be re-analysed, or shared, as logits only.

One row per intact run of the grid (teachers and students, with role, settings, seeds and
the path of its test logits; a teacher trained on other data than its students gives its
outputs on theirs), and the `labels` row: DIR/test_labels.npy. Paths are written relative
to the manifest's folder, as compare reads them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from kdaudit.compare.errors import CompareError
from kdaudit.compare.manifest import LABELS, roles
from kdaudit.protocol import RunSpec, expand
from kdaudit.store import STUDENTS_TEST_LOGITS, RunStore
from kdaudit.store.copied import TEST_LABELS, load_test_labels

COLUMNS = ("role", "alpha", "temperature", "seed", "teacher_seed", "path")


def export_manifest(
    out: str | Path, manifest: str | Path | None = None, data_dir: str | Path | None = None
) -> tuple[Path, int]:
    """Write the manifest of run directory `out` (default OUT/manifest.csv); returns its
    path and the number of runs listed. `data_dir` is read only when OUT holds no
    test_labels.npy yet (it is then kept there)."""
    out = Path(out)
    store = RunStore(out)
    cfg = store.load_experiment()
    grid = expand(cfg)
    _check_exportable(grid)
    if load_test_labels(out, cfg, data_dir) is None:
        raise CompareError(f"{out} holds no {TEST_LABELS} and the data are not found; give "
                           "--data-dir (the folder of the audit's dataset)")  # fmt: skip
    manifest = Path(manifest) if manifest is not None else out / "manifest.csv"
    rows = [_row(store, spec, manifest.parent) for spec in grid.runs]
    rows = [r for r in rows if r is not None]
    if not rows:
        raise CompareError(f"{out} holds no complete run yet; run `kdaudit run` first")
    labels = {"role": LABELS, "path": _relative(out / TEST_LABELS, manifest.parent)}
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows([labels, *rows])
    return manifest, len(rows)


def _check_exportable(grid) -> None:
    """What a manifest cannot say: a capacity grid's widths, your own losses."""
    if any(s.width is not None for s in grid.students):
        raise CompareError("a capacity grid (protocol.student_widths) has no manifest form: "
                           "the manifest has no width column")  # fmt: skip
    if any(t.label_noise for t in grid.teachers):
        raise CompareError("a teacher-error sweep (protocol.teacher_label_noise) has no "
                           "manifest form: the manifest has one teacher per teacher seed")  # fmt: skip
    unknown = sorted({s.condition for s in grid.runs} - set(roles()))
    if unknown:
        raise CompareError(f"condition {unknown[0]} has no manifest role; compare knows "
                           f"{', '.join(roles()[1:])}")  # fmt: skip


def _row(store: RunStore, spec: RunSpec, folder: Path) -> dict | None:
    """The manifest row of an intact run, else None (pending, failed or damaged)."""
    if not store.is_complete(spec.run_id) or store.verify(spec.run_id) is not None:
        return None
    name = "test_logits"
    if spec.is_teacher and spec.students_data is not None:
        name = STUDENTS_TEST_LOGITS
    path = store.runs / spec.run_id / f"{name}.npy"
    if spec.is_teacher:
        seed, teacher_seed = spec.teacher_seed, ""
    else:
        seed, teacher_seed = spec.student_seed, spec.teacher_seed
    return {"role": spec.condition, "alpha": _blank(spec.alpha),
            "temperature": _blank(spec.temperature), "seed": seed,
            "teacher_seed": teacher_seed, "path": _relative(path, folder)}  # fmt: skip


def _blank(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _relative(path: Path, folder: Path) -> str:
    return os.path.relpath(path.resolve(), folder.resolve())
