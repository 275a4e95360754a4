"""What transferred: the agreement gained over a control on the teacher's correct and on its
incorrect test examples (PROTOCOL section 6, and the robust view of section 10).

Two views of one setting:
- the paper's (`paper_asymmetry`): one baseline control B (the most accurate control), raw
  deltas, labelled by the point estimates within a tolerance, with a one-sided test;
- the robust one (`asymmetry_matrix`, `robust_label`): every control present, on two
  scales, each cell labelled by its one-sided tests, and the setting's label the common
  label of its verdict controls' cells, `baseline-dependent` when they differ.

Scales of a per-seed delta in bucket b (correct, incorrect), treatment against control B:
    raw       A_b(treatment) - A_b(B)
    headroom  (A_b(treatment) - A_b(B)) / (1 - A_b(B)), the share of B's remaining
              disagreement the treatment closed; undefined where A_b(B) = 1 (such seeds are
              counted in the cell's n_undefined, never silently dropped)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from kdaudit.conditions import label
from kdaudit.config import AnalysisOptions
from kdaudit.stats.paired import (
    PairedTest,
    hodges_lehmann,
    mean_interval,
    min_pairs,
    paired_wilcoxon,
    sem,
)

SCALES = ("raw", "headroom")
CELL_LABELS = ("negative", "positive", "symmetric", "undetermined")
ROBUST_LABELS = ("negative", "positive", "symmetric", "baseline-dependent", "undetermined")
AGREEMENT = {"correct": "correct_agreement", "incorrect": "incorrect_agreement"}


# ----------------------------------------------------------------------------- the paper's view


@dataclass(frozen=True)
class Asymmetry:
    """The paper's view: agreement gained on teacher-correct vs teacher-incorrect examples
    over one control B, labelled by the point estimates within the tolerance."""

    baseline_correct: str  # control B for delta_correct ("" when undetermined)
    baseline_incorrect: str  # control B for delta_incorrect
    delta_correct: float  # mean over seeds of A_correct(KD) - A_correct(B)
    delta_incorrect: float  # mean over seeds of A_incorrect(KD) - A_incorrect(B)
    label: str  # negative / symmetric / positive / undetermined
    test: PairedTest | None  # d_incorrect vs d_correct, one-sided "greater"
    n: int
    student_seeds: tuple = ()
    d_correct: tuple[float, ...] = ()  # per seed, aligned with student_seeds
    d_incorrect: tuple[float, ...] = ()

    @property
    def best_control(self) -> str:
        if self.baseline_correct == self.baseline_incorrect:
            return self.baseline_correct
        return f"correct:{self.baseline_correct}/incorrect:{self.baseline_incorrect}"

    @property
    def sem_correct(self) -> float:
        return sem(self.d_correct)

    @property
    def sem_incorrect(self) -> float:
        return sem(self.d_incorrect)

    @property
    def pvalue(self) -> float:
        return math.nan if self.test is None else self.test.pvalue

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            dict(
                student_seed=list(self.student_seeds),
                baseline_correct=self.baseline_correct,
                baseline_incorrect=self.baseline_incorrect,
                d_correct=list(self.d_correct),
                d_incorrect=list(self.d_incorrect),
            ),
            columns=ASYMMETRY_COLUMNS,
        )


ASYMMETRY_COLUMNS = ["student_seed", "baseline_correct", "baseline_incorrect"]
ASYMMETRY_COLUMNS += ["d_correct", "d_incorrect"]


def paper_asymmetry(kd, controls, options: AnalysisOptions) -> tuple[Asymmetry, list[str]]:
    """PROTOCOL section 6 as the paper does it, with its tested extension."""
    candidates = {k: v for k, v in controls.items() if k not in options.exclude_controls}
    b_correct, b_incorrect = _baselines(candidates, options.baseline)
    if b_correct is None or b_incorrect is None:
        return _undetermined(b_correct, b_incorrect), ["asymmetry undetermined: no usable control"]
    d = _agreement_deltas(kd, candidates[b_correct], candidates[b_incorrect])
    if d.empty:
        note = "asymmetry undetermined: no seed with both agreement buckets for KD and control"
        return _undetermined(b_correct, b_incorrect), [note]
    test = paired_wilcoxon(
        d["incorrect"],
        d["correct"],
        "higher",
        metric="delta_incorrect_minus_delta_correct",
        level=options.alpha_level,
    )
    label_ = _point_label(test.mean_control, test.mean_treatment, options.asymmetry_tolerance)
    return Asymmetry(
        baseline_correct=b_correct,
        baseline_incorrect=b_incorrect,
        delta_correct=test.mean_control,
        delta_incorrect=test.mean_treatment,
        label=label_,
        test=test,
        n=len(d),
        student_seeds=tuple(d.index),
        d_correct=tuple(float(x) for x in d["correct"]),
        d_incorrect=tuple(float(x) for x in d["incorrect"]),
    ), []


def _baselines(candidates, baseline: str) -> tuple[str | None, str | None]:
    """Control B for (delta_correct, delta_incorrect) as PROTOCOL section 6 chooses it."""
    if baseline == "accuracy":
        best = _best_control(candidates, "accuracy")
        return best, best
    return (
        _best_control(candidates, AGREEMENT["correct"]),
        _best_control(candidates, AGREEMENT["incorrect"]),
    )


def _best_control(candidates: Mapping[str, pd.DataFrame], metric: str) -> str | None:
    """The control with the highest mean `metric` over its runs; ties go to the design's order."""
    means = {
        name: float(np.nanmean(w[metric])) if metric in w and w[metric].notna().any() else math.nan
        for name, w in candidates.items()
    }
    means = {k: v for k, v in means.items() if not math.isnan(v)}
    return max(means, key=means.__getitem__) if means else None


def _agreement_deltas(kd, b_correct, b_incorrect, scale: str = "raw") -> pd.DataFrame:
    """Per student seed: the treatment's agreement over the baseline's, on each teacher
    bucket, on `scale` (headroom: NaN where the baseline's agreement is 1)."""
    columns = {}
    for bucket, baseline in (("correct", b_correct), ("incorrect", b_incorrect)):
        metric = AGREEMENT[bucket]
        if metric not in kd or metric not in baseline:
            return pd.DataFrame(columns=["correct", "incorrect"])
        delta = kd[metric] - baseline[metric]  # aligned on student_seed
        if scale == "headroom":
            room = 1.0 - baseline[metric]
            delta = delta / room.where(room > 0)
        columns[bucket] = delta
    frame = pd.DataFrame(columns)
    if scale == "raw":
        return frame.dropna().sort_index()
    return frame.sort_index()  # headroom keeps its undefined seeds, for the count


def _point_label(delta_correct: float, delta_incorrect: float, tolerance: float) -> str:
    diff = delta_incorrect - delta_correct
    if abs(diff) <= tolerance:
        return "symmetric"
    return "negative" if diff > tolerance else "positive"


def _undetermined(b_correct: str | None, b_incorrect: str | None) -> Asymmetry:
    return Asymmetry(
        baseline_correct=b_correct or "",
        baseline_incorrect=b_incorrect or "",
        delta_correct=math.nan,
        delta_incorrect=math.nan,
        label="undetermined",
        test=None,
        n=0,
    )


# ----------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class AsymmetryCell:
    """One control on one scale: the mean deltas with their 95% t intervals over paired
    seeds, and the one-sided Wilcoxon tests of (delta_incorrect - delta_correct) each way."""

    control: str
    scale: str  # raw | headroom
    n: int  # seeds with both deltas defined
    delta_correct: float
    delta_incorrect: float
    delta_correct_ci: tuple[float, float]
    delta_incorrect_ci: tuple[float, float]
    p_negative: float  # one-sided: delta_incorrect > delta_correct
    p_positive: float  # one-sided: delta_incorrect < delta_correct
    label: str  # negative | positive | symmetric | undetermined
    difference: float = math.nan  # Hodges-Lehmann estimate of delta_incorrect - delta_correct
    difference_ci: tuple[float, float] = (math.nan, math.nan)  # its exact 95% interval
    effect_size: float = math.nan  # rank-biserial of the differences, + = negative direction
    n_undefined: int = 0  # headroom: seeds whose control agreement is 1 in a bucket
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: the intervals as two-item lists."""
        d = asdict(self)
        for key in ("delta_correct_ci", "delta_incorrect_ci", "difference_ci"):
            d[key] = list(d[key])
        return d


MATRIX_COLUMNS = ["control", "scale", "n", "delta_correct", "delta_correct_low"]
MATRIX_COLUMNS += ["delta_correct_high", "delta_incorrect", "delta_incorrect_low"]
MATRIX_COLUMNS += ["delta_incorrect_high", "difference", "difference_low", "difference_high"]
MATRIX_COLUMNS += ["effect_size", "p_negative", "p_positive", "label", "n_undefined", "note"]


def cell_row(cell: AsymmetryCell) -> dict:
    """A flat row of the matrix table (asymmetry_matrix.csv)."""
    d = cell.to_dict()
    for key in ("delta_correct", "delta_incorrect", "difference"):
        d[f"{key}_low"], d[f"{key}_high"] = d.pop(f"{key}_ci")
    return {k: d[k] for k in MATRIX_COLUMNS}


def asymmetry_matrix(
    kd: pd.DataFrame, controls: Mapping[str, pd.DataFrame], options: AnalysisOptions
) -> tuple[AsymmetryCell, ...]:
    """A cell per control present (in the design's order) and scale."""
    return tuple(
        _cell(kd, table, name, scale, options)
        for name, table in controls.items()
        for scale in SCALES
    )


def _cell(kd, control, name: str, scale: str, options: AnalysisOptions) -> AsymmetryCell:
    deltas = _agreement_deltas(kd, control, control, scale)
    defined = deltas.dropna()
    undefined = len(deltas) - len(defined)
    nan2 = (math.nan, math.nan)
    empty = dict(control=name, scale=scale, n=len(defined), n_undefined=undefined,
                 delta_correct_ci=nan2, delta_incorrect_ci=nan2)  # fmt: skip
    if defined.empty:
        why = "no seed with both agreement buckets"
        if undefined:
            why = f"headroom undefined: {label(name)} agrees with the teacher on every example"
        return AsymmetryCell(**empty, delta_correct=math.nan, delta_incorrect=math.nan,
                             p_negative=math.nan, p_positive=math.nan, label="undetermined",
                             note=why)  # fmt: skip
    correct, incorrect = defined["correct"].to_numpy(), defined["incorrect"].to_numpy()
    level = options.alpha_level
    negative = paired_wilcoxon(incorrect, correct, "higher", level=level)
    positive = paired_wilcoxon(incorrect, correct, "lower", level=level)
    mc, *ci_c = mean_interval(correct)
    mi, *ci_i = mean_interval(incorrect)
    estimate, low, high = hodges_lehmann(incorrect - correct)
    label_, note = _cell_label(negative, positive, (low, high), len(defined), options)
    if undefined:
        note = "; ".join(filter(None, [note, f"headroom undefined for {undefined} seed(s)"]))
    return AsymmetryCell(
        **{**empty, "delta_correct_ci": tuple(ci_c), "delta_incorrect_ci": tuple(ci_i)},
        delta_correct=mc,
        delta_incorrect=mi,
        p_negative=negative.pvalue,
        p_positive=positive.pvalue,
        label=label_,
        difference=estimate,
        difference_ci=(low, high),
        effect_size=negative.effect_size,
        note=note,
    )


def _cell_label(negative, positive, interval, n: int, options) -> tuple[str, str]:
    if negative.significant:
        return "negative", ""
    if positive.significant:
        return "positive", ""
    tol = options.asymmetry_tolerance
    if -tol <= interval[0] and interval[1] <= tol:
        return "symmetric", ""
    if n < min_pairs(options.alpha_level):
        return "undetermined", f"n={n} cannot reach {options.alpha_level:g}"
    return "undetermined", ""


def robust_label(cells: Sequence[AsymmetryCell], controls: Sequence[str]) -> tuple[str, str]:
    """(label, why): the common label of the cells of `controls` (both scales), or
    `baseline-dependent` naming the cells that disagree; `undetermined` when a control has
    no cell."""
    missing = [c for c in controls if not any(cell.control == c for cell in cells)]
    if missing or not controls:
        names = " and ".join(label(c) for c in missing) or "verdict controls"
        return "undetermined", f"no {names} runs to compare with"
    used = [cell for cell in cells if cell.control in controls]
    labels = {cell.label for cell in used}
    if len(labels) == 1:
        return labels.pop(), ""
    return "baseline-dependent", disagreement(used)


def disagreement(cells: Sequence[AsymmetryCell]) -> str:
    """'negative vs RCD (raw, headroom), positive vs SIDDO (headroom), ...'"""
    groups: dict[tuple[str, str], list[str]] = {}
    for cell in cells:
        groups.setdefault((cell.label, cell.control), []).append(cell.scale)
    order = {name: i for i, name in enumerate(CELL_LABELS)}
    parts = sorted(groups.items(), key=lambda kv: order.get(kv[0][0], 9))
    return ", ".join(f"{lab} vs {label(c)} ({', '.join(s)})" for (lab, c), s in parts)
