"""The manifest of `kdaudit compare`: which saved logits belong to which model.

A CSV file with a header row; one row per model, plus one `labels` row:

    role,alpha,temperature,seed,teacher_seed,path
    labels,,,,,labels.npy
    teacher,,,0,,teacher0.npy
    siddo,,,10,0,siddo_s10.npy
    kd,0.5,1,10,0,kd_a0.5_s10.safetensors
    rcd,0.5,1,10,0,rcd_a0.5_s10.pt

- role: `teacher`, `labels`, or a student condition (siddo, kd, rcd, ls, fmkd, fmrc).
- alpha, temperature: the condition's settings. kd and rcd need alpha, and their empty
  temperature means 1; ls needs alpha and takes no temperature; siddo and teachers take
  neither. A value where the condition has no such setting is an error.
- seed: the student seed (pairs runs across conditions); for a teacher, its teacher seed.
- teacher_seed: the teacher a student was distilled from or paired with (default 0, also
  when the column is absent).
- path: the logits (or labels) file, or a top-k file (kdaudit.compare.files: topk_ids,
  topk_logprobs, vocab_size); relative paths are resolved against the manifest's folder.
  The labels row needs only its path.

Columns alpha, temperature and teacher_seed may be left out. Whitespace around values is
ignored; empty lines are skipped.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from kdaudit.compare.errors import CompareError
from kdaudit.conditions import builtin, condition, is_treatment

REQUIRED = ("role", "seed", "path")
OPTIONAL = ("alpha", "temperature", "teacher_seed")
TEACHER, LABELS = "teacher", "labels"
DEFAULT_TEMPERATURE = 1.0  # kd / rcd rows with an empty temperature


@dataclass(frozen=True)
class ModelRow:
    line: int  # line number in the manifest file (the header is line 1)
    role: str  # "teacher" or a condition name
    alpha: float | None
    temperature: float | None
    seed: int  # the student seed; for a teacher, its teacher seed
    teacher_seed: int
    path: Path  # absolute

    @property
    def is_teacher(self) -> bool:
        return self.role == TEACHER

    @property
    def label(self) -> str:
        """Like a training run's label: kd_a0.5_T1_t0_s10 (teachers: teacher_t0)."""
        parts = [self.role]
        if self.alpha is not None:
            parts.append(f"a{self.alpha:g}")
        if self.temperature is not None:
            parts.append(f"T{self.temperature:g}")
        parts.append(f"t{self.teacher_seed}")
        if not self.is_teacher:
            parts.append(f"s{self.seed}")
        return "_".join(parts)

    @property
    def key(self) -> tuple:
        return (self.role, self.alpha, self.temperature, self.seed, self.teacher_seed)

    def where(self) -> str:
        return f"manifest line {self.line}, {self.label}"


@dataclass(frozen=True)
class Manifest:
    path: Path
    labels: Path
    labels_line: int
    teachers: tuple[ModelRow, ...]
    students: tuple[ModelRow, ...]

    def teacher_of(self, student: ModelRow) -> ModelRow:
        return next(t for t in self.teachers if t.seed == student.teacher_seed)


def roles() -> list[str]:
    return [LABELS, TEACHER, *sorted(c.name for c in builtin() if c.name != TEACHER)]


def read_manifest(path: str | Path) -> Manifest:
    """Parse and check a manifest; CompareError names the line and what to change."""
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"manifest not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        _check_columns(reader.fieldnames, path)
        records = [
            (reader.line_num, r) for r in reader if any((v or "").strip() for v in r.values())
        ]
    labels = [(line, r) for line, r in records if _value(r, "role", line) == LABELS]
    rows = [_row(line, r, path.parent) for line, r in records if _value(r, "role", line) != LABELS]
    manifest = Manifest(
        path=path,
        labels=_labels_path(labels, path),
        labels_line=labels[0][0],
        teachers=tuple(r for r in rows if r.is_teacher),
        students=tuple(r for r in rows if not r.is_teacher),
    )
    _check_rows(manifest)
    return manifest


def _check_columns(fieldnames, path: Path) -> None:
    if not fieldnames:
        raise CompareError(f"{path}: empty manifest; the first line must name the columns")
    names = [n.strip() for n in fieldnames]
    unknown = [n for n in names if n not in (*REQUIRED, *OPTIONAL)]
    missing = [n for n in REQUIRED if n not in names]
    if unknown or missing:
        problem = f"unknown columns {unknown}" if unknown else f"missing columns {missing}"
        raise CompareError(
            f"{path}: {problem}; columns are {', '.join(REQUIRED)} (required) and "
            f"{', '.join(OPTIONAL)} (optional)"
        )


def _value(record: dict, column: str, line: int) -> str:
    if None in record:  # csv.DictReader's key for values beyond the header's columns
        raise CompareError(f"manifest line {line}: more values than columns")
    for name, value in record.items():
        if name.strip() == column:
            return (value or "").strip()
    return ""


def _labels_path(labels: list, manifest: Path) -> Path:
    if not labels:
        raise CompareError(f"{manifest}: no `labels` row; add one whose path is the labels file")
    if len(labels) > 1:
        lines = " and ".join(str(line) for line, _ in labels)
        raise CompareError(f"{manifest}: lines {lines} are both `labels` rows; keep one")
    line, record = labels[0]
    return _path(record, line, manifest.parent)


def _row(line: int, record: dict, folder: Path) -> ModelRow:
    role = _value(record, "role", line)
    if role not in roles():
        raise CompareError(
            f"manifest line {line}: unknown role {role!r}; roles are {', '.join(roles())}"
        )
    params = condition(role).params
    seed = _int(record, "seed", line, default=None)
    teacher_seed = _int(record, "teacher_seed", line, default=seed if role == TEACHER else 0)
    if role == TEACHER and teacher_seed != seed:
        raise CompareError(
            f"manifest line {line}: a teacher's teacher_seed ({teacher_seed}) must equal its "
            f"seed ({seed}); leave teacher_seed empty"
        )
    return ModelRow(
        line=line,
        role=role,
        alpha=_setting(record, "alpha", role, params, line),
        temperature=_setting(record, "temperature", role, params, line),
        seed=seed,
        teacher_seed=teacher_seed,
        path=_path(record, line, folder),
    )


def _int(record: dict, column: str, line: int, default: int | None) -> int:
    text = _value(record, column, line)
    if not text:
        if default is None:
            raise CompareError(f"manifest line {line}: {column} is empty; give an integer")
        return default
    try:
        return int(text)
    except ValueError:
        raise CompareError(f"manifest line {line}: {column}={text!r} is not an integer") from None


def _setting(record: dict, column: str, role: str, params, line: int) -> float | None:
    text = _value(record, column, line)
    if column not in params:
        if text:
            raise CompareError(
                f"manifest line {line}: {role} takes no {column} (got {text!r}); leave it empty"
            )
        return None
    if not text:
        if column == "temperature":
            return DEFAULT_TEMPERATURE
        raise CompareError(f"manifest line {line}: {role} needs a value for {column}")
    try:
        value = float(text)
    except ValueError:
        raise CompareError(f"manifest line {line}: {column}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise CompareError(f"manifest line {line}: {column}={text!r} is not a finite number")
    return value


def _path(record: dict, line: int, folder: Path) -> Path:
    text = _value(record, "path", line)
    if not text:
        raise CompareError(f"manifest line {line}: path is empty")
    path = (folder / Path(text).expanduser()).resolve()
    if not path.is_file():
        raise CompareError(f"manifest line {line}: file not found: {path}")
    return path


def _check_rows(manifest: Manifest) -> None:
    seen: dict[tuple, ModelRow] = {}
    for row in (*manifest.teachers, *manifest.students):
        if row.key in seen:
            raise CompareError(
                f"manifest lines {seen[row.key].line} and {row.line} both describe "
                f"{row.label}; each (role, alpha, temperature, seed, teacher_seed) once"
            )
        seen[row.key] = row
    if not manifest.teachers:
        raise CompareError(f"{manifest.path}: no `teacher` row")
    if not any(is_treatment(r.role) for r in manifest.students):
        treatments = ", ".join(c.name for c in builtin() if c.is_treatment)
        raise CompareError(f"{manifest.path}: no treatment rows ({treatments}); compare tests "
                           "treated students against their controls")  # fmt: skip
    teacher_seeds = sorted(t.seed for t in manifest.teachers)
    for row in manifest.students:
        if row.teacher_seed not in teacher_seeds:
            raise CompareError(
                f"{row.where()}: teacher_seed {row.teacher_seed} has no teacher row "
                f"(teacher seeds: {', '.join(map(str, teacher_seeds))})"
            )
