"""Checks that run before any metric is computed, so a mistake costs seconds, not hours.

Errors (CompareError) versus warnings:

- every logits file must have the first teacher's shape (N, K) or (N, T, V) and a floating
  dtype; a top-k file integer `topk_ids` and floating `topk_logprobs` of one shape (N, k) or
  (N, T, k) with k <= vocab_size, and vocab_size = K; the labels must be integers of shape
  (N,) or (N, T) in [0, K): errors naming the files;
- a treatment's setting (teacher seed, alpha, T) with none of its verdict's controls paired
  (for kd: siddo and rcd; same teacher seed and student seed, and the control's own params,
  rcd's alpha and T) cannot be tested at all: an error listing what is missing;
- one of those controls missing for a setting, or missing for some of its student seeds: a
  warning (returned as a note). The analysis still runs: without every control the verdict
  is "not supported" and says why, and unpaired seeds are left out of the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdaudit.compare.errors import CompareError
from kdaudit.compare.files import TopkFile, open_array, open_logits
from kdaudit.compare.manifest import Manifest, ModelRow
from kdaudit.conditions import condition, is_treatment


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]  # of every full logits file: (..., K); a top-k file's (..., V)
    labels: torch.Tensor  # int64, shape[:-1]
    topk: int | None = None  # the top-k view's k (the smallest k of the top-k files), or None
    topk_files: int = 0  # how many of the files are top-k files

    @property
    def k(self) -> int:
        return self.shape[-1]

    @property
    def n(self) -> int:
        return math.prod(self.shape[:-1])


def check_files(manifest: Manifest) -> Layout:
    """Open every file (headers only, labels fully) and check they fit together."""
    reference = manifest.teachers[0]
    shape, _ = _logits_shape(reference)
    ks = []
    for row in (*manifest.teachers, *manifest.students):
        other, k = _logits_shape(row)
        ks += [] if k is None else [k]
        if other != shape:
            raise CompareError(
                f"{_mismatch(shape, other)}: {reference.path} ({reference.where()}) has shape "
                f"{shape} but {row.path} ({row.where()}) has {other}"
            )
    labels = _labels(manifest, shape)
    high, low = int(labels.max()), int(labels.min())
    if high >= shape[-1] or low < 0:
        raise CompareError(
            f"labels {manifest.labels} hold class {high if low >= 0 else low}, outside the "
            f"[0, {shape[-1]}) range of teacher {reference.path} (K={shape[-1]} outputs); the "
            "labels and logits must index the same classes"
        )
    return Layout(shape, labels, min(ks) if ks else None, len(ks))


def _logits_shape(row: ModelRow) -> tuple[tuple[int, ...], int | None]:
    """The file's (..., K) shape (a top-k file's (..., vocab_size)) and its k (None: full)."""
    array = open_logits(row.path)
    try:
        if isinstance(array, TopkFile):
            return _topk_shape(row, array), array.k
        if not array.dtype.is_floating_point:
            raise CompareError(
                f"{row.path} ({row.where()}): logits have dtype {array.dtype}; "
                "save floating-point logits"
            )
        if len(array.shape) < 2 or array.shape[-1] < 2 or 0 in array.shape:
            raise CompareError(
                f"{row.path} ({row.where()}): logits have shape {array.shape}; "
                "need (N, K) or (N, T, V) with N >= 1 and K >= 2"
            )
        return array.shape, None
    finally:
        array.close()


def _topk_shape(row: ModelRow, topk: TopkFile) -> tuple[int, ...]:
    where = f"{row.path} ({row.where()})"
    ids, logprobs = topk.ids, topk.logprobs
    if (
        ids.dtype.is_floating_point
        or ids.dtype == torch.bool
        or not logprobs.dtype.is_floating_point
    ):
        raise CompareError(f"{where}: topk_ids have dtype {ids.dtype} and topk_logprobs "
                           f"{logprobs.dtype}; save integer ids and float log-probabilities")  # fmt: skip
    if ids.shape != logprobs.shape or len(ids.shape) < 2 or 0 in ids.shape:
        raise CompareError(f"{where}: topk_ids have shape {ids.shape} and topk_logprobs "
                           f"{logprobs.shape}; need one shape (N, k) or (N, T, k), N, k >= 1")  # fmt: skip
    if topk.k > topk.vocab_size:
        raise CompareError(f"{where}: k={topk.k} ids per position but vocab_size is "
                           f"{topk.vocab_size}; k must be at most vocab_size")  # fmt: skip
    return (*ids.shape[:-1], topk.vocab_size)


def _mismatch(a: tuple[int, ...], b: tuple[int, ...]) -> str:
    if len(a) != len(b):
        return "logits have different numbers of dimensions"
    if a[-1] != b[-1]:
        return f"logits have different K (classes/vocabulary: {a[-1]} vs {b[-1]})"
    return "logits cover different numbers of examples (N)"


def _labels(manifest: Manifest, shape: tuple[int, ...]) -> torch.Tensor:
    array = open_array(manifest.labels, key="labels")
    try:
        where = f"labels {manifest.labels} (manifest line {manifest.labels_line})"
        if array.dtype.is_floating_point or array.dtype.is_complex or array.dtype == torch.bool:
            raise CompareError(f"{where}: dtype {array.dtype}; save integer class indices")
        if tuple(array.shape) != shape[:-1]:
            raise CompareError(
                f"{where} have shape {tuple(array.shape)} but logits {manifest.teachers[0].path} "
                f"have shape {shape}: need one label per example, shape {shape[:-1]}"
            )
        return array.load().long()
    finally:
        array.close()


def check_controls(manifest: Manifest) -> list[str]:
    """Warnings about treatment runs without a paired control; CompareError when none is."""
    warnings = []
    for (role, teacher_seed, alpha, temperature), seeds in _treatment_settings(manifest).items():
        setting = f"teacher seed {teacher_seed}, {role} alpha={alpha:g} T={temperature:g}"
        controls = condition(role).controls
        missing = {c: seeds - _control_seeds(manifest, c, teacher_seed, alpha, temperature)
                   for c in controls}  # fmt: skip
        if all(m == seeds for m in missing.values()):
            wanted = " and ".join(f"{c} rows ({_control_keys(c, teacher_seed, alpha, temperature)})"
                                  for c in controls)  # fmt: skip
            raise CompareError(
                f"{setting} (student seeds {_list(seeds)}): no paired control; add {wanted} "
                "with the same student seeds"
            )
        for control, seeds_missing in missing.items():
            if seeds_missing == seeds:
                warnings.append(
                    f"{setting}: no {control} rows for its student seeds, so the verdict "
                    f"(which needs {' and '.join(controls)}) is not supported"
                )
            elif seeds_missing:
                warnings.append(
                    f"{setting}: no {control} rows for student seeds "
                    f"{_list(seeds_missing)}; those {role} runs have no {control} pair"
                )
    return warnings


def _treatment_settings(manifest: Manifest) -> dict[tuple, set[int]]:
    """(treatment, teacher seed, alpha, T) -> its student seeds."""
    settings: dict[tuple, set[int]] = {}
    for row in manifest.students:
        if is_treatment(row.role):
            key = (row.role, row.teacher_seed, row.alpha, row.temperature)
            settings.setdefault(key, set()).add(row.seed)
    return dict(sorted(settings.items(), key=lambda kv: (condition(kv[0][0]).order, kv[0][1:])))


def _control_seeds(manifest: Manifest, control: str, teacher_seed: int, alpha, temperature):
    """A control's student seeds paired with a setting, matched on the control's params."""
    params = condition(control).params
    return _seeds(manifest, control, teacher_seed, alpha if "alpha" in params else None,
                  temperature if "temperature" in params else None)  # fmt: skip


def _control_keys(control: str, teacher_seed: int, alpha, temperature) -> str:
    params = condition(control).params
    if not params:
        return f"teacher_seed {teacher_seed}"
    values = {"alpha": alpha, "temperature": temperature}
    return ", ".join(f"{p}={values[p]:g}" for p in params)


def _seeds(manifest: Manifest, role: str, teacher_seed: int, alpha=None, temperature=None):
    return {
        r.seed
        for r in manifest.students
        if r.role == role
        and r.teacher_seed == teacher_seed
        and (alpha is None or math.isclose(r.alpha, alpha, rel_tol=1e-9, abs_tol=1e-12))
        and (
            temperature is None
            or math.isclose(r.temperature, temperature, rel_tol=1e-9, abs_tol=1e-12)
        )
    }


def _list(seeds: set[int]) -> str:
    return ", ".join(map(str, sorted(seeds)))
