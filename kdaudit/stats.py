"""Paired statistics for the transfer decision (PROTOCOL sections 5 and 6).

Input is the tidy run table, one row per run per metric. A *setting* is one
(teacher_seed, alpha, temperature, width) of a treatment condition; its runs are paired with
the runs of each of its controls at the same student width by student seed, which is what
makes the Wilcoxon signed-rank tests paired. Which controls a treatment has, and which
setting parameters each shares with it, is a `Designs` table passed in (by default the
condition registry's, kdaudit.conditions.designs()). A parameter a condition does not have
(a feature-map treatment's temperature) is NaN. The metrics, their better directions and
which of them are functional come from the metric registry (kdaudit.metrics). `width` (capacity grids) is optional: a table without it
is one width, NaN.
Everything here computes at full precision; rounding and formatting belong to the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats as sps

from kdaudit.conditions import Designs, label
from kdaudit.conditions import designs as registered_designs
from kdaudit.config import AnalysisOptions
from kdaudit.metrics import better_directions, functional_metrics

REQUIRED_COLUMNS = (
    "run_id",
    "teacher_seed",
    "student_seed",
    "condition",
    "alpha",
    "temperature",
    "metric",
    "value",
)
SETTING_KEYS = ("teacher_seed", "condition", "alpha", "temperature", "width")


DIRECTIONS = ("lower", "higher")
BASELINES = ("accuracy", "agreement")
VERDICTS = ("supported", "marginal", "not_supported")
ASYMMETRY_LABELS = ("negative", "symmetric", "positive", "undetermined")


# ----------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class PairedTest:
    """One-sided Wilcoxon signed-rank test of treatment vs control in the better direction."""

    metric: str
    better: str
    n: int  # pairs
    n_nonzero: int  # pairs with a nonzero difference: the pairs scipy actually ranks
    statistic: float  # sum of the ranks of the positive differences (NaN when all_zero)
    pvalue: float  # one-sided, NaN when all_zero
    all_zero: bool
    mean_treatment: float
    mean_control: float
    p_adjusted: float = math.nan  # Benjamini-Hochberg; NaN for tests outside an FDR family
    significant: bool = False

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(self)])


def paired_wilcoxon(
    treatment: Sequence[float] | np.ndarray,
    control: Sequence[float] | np.ndarray,
    better: str,
    *,
    metric: str = "",
    level: float = 0.05,
) -> PairedTest:
    """Test whether treatment is better than control on paired samples.

    `significant` is `pvalue <= level`; an FDR family overrides it (see `apply_fdr`).
    """
    if better not in DIRECTIONS:
        raise ValueError(f"better must be one of {DIRECTIONS}, got {better!r}")
    t, c = _paired_arrays(treatment, control)
    d = t - c
    common = dict(
        metric=metric,
        better=better,
        n=int(d.size),
        n_nonzero=int(np.count_nonzero(d)),
        mean_treatment=float(t.mean()),
        mean_control=float(c.mean()),
    )
    if common["n_nonzero"] == 0:
        # No evidence either way; scipy would return a misleading p (or NaN), so do not ask.
        return PairedTest(**common, statistic=math.nan, pvalue=math.nan, all_zero=True)
    # zero_method="wilcox" (scipy's default) discards zero differences before ranking, so the
    # test runs on n_nonzero pairs. method="auto": exact null for n_nonzero <= 50 without
    # ties or zeros, exhaustive permutations when there are ties/zeros and n <= 13,
    # the normal approximation otherwise.
    alternative = "less" if better == "lower" else "greater"
    res = sps.wilcoxon(d, alternative=alternative, method="auto")
    p = float(res.pvalue)
    return PairedTest(
        **common, statistic=float(res.statistic), pvalue=p, all_zero=False, significant=p <= level
    )


def _paired_arrays(treatment, control) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(treatment, dtype=np.float64).ravel()
    c = np.asarray(control, dtype=np.float64).ravel()
    if t.size != c.size:
        raise ValueError(f"paired samples differ in length: {t.size} vs {c.size}")
    if t.size < 1:
        raise ValueError("a paired test needs at least one pair")
    if not (np.isfinite(t).all() and np.isfinite(c).all()):
        raise ValueError("paired samples must be finite (drop incomplete pairs first)")
    return t, c


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """BH-adjusted p-values; NaN entries stay NaN and are not counted in the family."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = sps.false_discovery_control(p[ok], method="bh")
    return out


def apply_fdr(tests: Sequence[PairedTest], q: float) -> tuple[PairedTest, ...]:
    """Adjust a family of tests jointly; significant iff the adjusted p-value <= q."""
    adjusted = benjamini_hochberg([t.pvalue for t in tests])
    return tuple(
        replace(t, p_adjusted=float(p), significant=bool(p <= q))
        for t, p in zip(tests, adjusted, strict=True)
    )


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ControlComparison:
    teacher_seed: int
    condition: str
    alpha: float
    temperature: float
    control: str
    n: int  # student seeds present in both the setting and the control
    tests: tuple[PairedTest, ...]
    width: float = math.nan  # student width fraction (capacity grids)

    def test(self, metric: str) -> PairedTest | None:
        return next((t for t in self.tests if t.metric == metric), None)

    def to_frame(self) -> pd.DataFrame:
        keys = dict(
            teacher_seed=self.teacher_seed,
            condition=self.condition,
            alpha=self.alpha,
            temperature=self.temperature,
            width=self.width,
            control=self.control,
        )
        return pd.DataFrame([{**keys, **asdict(t)} for t in self.tests], columns=_TEST_COLUMNS)


_TEST_COLUMNS = [*SETTING_KEYS, "control", *(f for f in PairedTest.__dataclass_fields__)]


@dataclass(frozen=True)
class Asymmetry:
    """Agreement gained on teacher-correct vs teacher-incorrect examples over control B."""

    baseline_correct: str  # control B for delta_correct ("" when undetermined)
    baseline_incorrect: str  # control B for delta_incorrect
    delta_correct: float  # mean over seeds of A_correct(KD) - A_correct(B)
    delta_incorrect: float  # mean over seeds of A_incorrect(KD) - A_incorrect(B)
    label: str  # negative / symmetric / positive / undetermined
    test: PairedTest | None  # d_incorrect vs d_correct, one-sided "greater"
    n: int
    student_seeds: tuple[int, ...] = ()
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
            columns=_ASYMMETRY_COLUMNS,
        )


_ASYMMETRY_COLUMNS = ["student_seed", "baseline_correct", "baseline_incorrect"]
_ASYMMETRY_COLUMNS += ["d_correct", "d_incorrect"]


@dataclass(frozen=True)
class SettingResult:
    teacher_seed: int
    condition: str
    alpha: float
    temperature: float
    n: int  # KD runs of this setting
    verdict: str
    n_significant: int  # functional metrics significant vs every verdict control
    relative_improvement: float  # median over functional metrics vs the reference, + = better
    comparisons: tuple[ControlComparison, ...]
    asymmetry: Asymmetry
    note: str = ""
    width: float = math.nan  # student width fraction (capacity grids)
    verdict_controls: tuple[str, ...] = ()  # the controls the verdict needs, reference first

    def comparison(self, control: str) -> ControlComparison | None:
        return next((c for c in self.comparisons if c.control == control), None)

    def to_frame(self) -> pd.DataFrame:
        a = self.asymmetry
        row = dict(
            teacher_seed=self.teacher_seed,
            condition=self.condition,
            alpha=self.alpha,
            temperature=self.temperature,
            width=self.width,
            n=self.n,
            verdict=self.verdict,
            n_significant=self.n_significant,
            relative_improvement=self.relative_improvement,
            asymmetry=a.label,
            delta_correct=a.delta_correct,
            delta_incorrect=a.delta_incorrect,
            best_control=a.best_control,
            asymmetry_p=a.pvalue,
            note=self.note,
        )
        return pd.DataFrame([row], columns=VERDICT_COLUMNS)


VERDICT_COLUMNS = [*SETTING_KEYS, "n", "verdict", "n_significant", "relative_improvement"]
VERDICT_COLUMNS += ["asymmetry", "delta_correct", "delta_incorrect", "best_control"]
VERDICT_COLUMNS += ["asymmetry_p", "note"]


@dataclass(frozen=True)
class Analysis:
    settings: tuple[SettingResult, ...]
    options: AnalysisOptions

    def verdicts_frame(self) -> pd.DataFrame:
        """One row per setting."""
        return _concat([s.to_frame() for s in self.settings], VERDICT_COLUMNS)

    def tests_frame(self) -> pd.DataFrame:
        """One row per (setting, control, metric)."""
        frames = [c.to_frame() for s in self.settings for c in s.comparisons]
        return _concat(frames, _TEST_COLUMNS)

    def asymmetry_frame(self) -> pd.DataFrame:
        """Per-seed agreement deltas, one row per (setting, student seed)."""
        frames = [_with_keys(s.asymmetry.to_frame(), s) for s in self.settings]
        return _concat(frames, [*SETTING_KEYS, *_ASYMMETRY_COLUMNS])

    def to_frame(self) -> pd.DataFrame:
        return self.verdicts_frame()


def _with_keys(frame: pd.DataFrame, s: SettingResult) -> pd.DataFrame:
    keys = dict(teacher_seed=s.teacher_seed, condition=s.condition, alpha=s.alpha,
                temperature=s.temperature, width=s.width)  # fmt: skip
    return frame.assign(**keys)


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


# ----------------------------------------------------------------------------- summaries


def sem(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean (ddof=1) of the non-NaN values; NaN below two values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(sps.sem(v, ddof=1)) if v.size >= 2 else math.nan


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, SEM and n per (teacher_seed, condition, alpha, temperature, width, metric)."""
    check_columns(runs)
    keys = [*SETTING_KEYS, "metric"]
    values = with_width(runs).assign(value=runs["value"].astype(np.float64))
    grouped = values.groupby(keys, dropna=False, sort=True)["value"]
    return grouped.agg(mean="mean", sem=sem, n="count").reset_index()


def with_width(runs: pd.DataFrame) -> pd.DataFrame:
    """The run table with a float `width` column (NaN: not a capacity grid)."""
    if "width" in runs.columns:
        return runs.astype({"width": np.float64})
    return runs.assign(width=np.nan)


def check_columns(runs: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in runs.columns]
    if missing:
        raise ValueError(
            f"runs is missing columns {missing}; expected columns: {list(REQUIRED_COLUMNS)}"
        )


# ----------------------------------------------------------------------------- analysis


DEFAULT_OPTIONS = AnalysisOptions()


def analyse(
    runs: pd.DataFrame, options: AnalysisOptions = DEFAULT_OPTIONS, designs: Designs | None = None
) -> Analysis:
    # designs: treatment -> its controls; None: the condition registry's
    """Test every treatment setting against its paired controls and decide the verdicts."""
    check_columns(runs)
    designs = registered_designs() if designs is None else designs
    _check_options(options, designs)
    runs = with_width(runs).assign(value=runs["value"].astype(np.float64))
    settings = [
        _analyse_setting(runs, treatment, key, controls, options)
        for treatment, controls in designs.items()
        for key in _treatment_settings(runs, treatment)
    ]
    return Analysis(tuple(settings), options)


def known_controls(designs: Designs) -> tuple[str, ...]:
    """Every control of the designs, in order of first appearance."""
    return tuple(dict.fromkeys(c for d in designs.values() for c in d.controls))


def _check_options(options: AnalysisOptions, designs: Designs) -> None:
    if options.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {options.baseline!r}")
    known = known_controls(designs)
    unknown = [c for c in options.exclude_controls if c not in known]
    if unknown:
        raise ValueError(f"exclude_controls has unknown controls {unknown}; known: {known}")
    better = better_directions()
    unknown = [m for m in options.metrics if m not in better]
    if unknown:
        raise ValueError(f"metrics has unknown metrics {unknown}; known: {sorted(better)}")


def _treatment_settings(runs: pd.DataFrame, treatment: str) -> list[tuple]:
    """(teacher seed, alpha, temperature, width) of every setting of `treatment`."""
    columns = ["teacher_seed", "width", "alpha", "temperature"]
    rows = runs.loc[runs["condition"] == treatment, columns].astype(
        {"alpha": np.float64, "temperature": np.float64}
    )
    rows = rows.drop_duplicates().sort_values(columns)
    return [(int(s), float(a), float(t), float(w)) for s, w, a, t in rows.itertuples(index=False)]


def _select(
    runs: pd.DataFrame, condition: str, key: Mapping[str, float], match=("alpha", "temperature")
) -> pd.DataFrame:
    """The runs of `condition` in setting `key`, matched on the columns `match`."""
    mask = (runs["condition"] == condition) & (runs["teacher_seed"] == key["teacher_seed"])
    for column in (*match, "width"):
        # float settings come from configs: compare with a tolerance. NaN (a parameter the
        # condition lacks, the width outside capacity grids) matches NaN only.
        mask &= np.isclose(runs[column].astype(np.float64), key[column], rtol=1e-9, atol=1e-12,
                           equal_nan=True)  # fmt: skip
    return runs[mask]


def _wide(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """(student seeds, metrics) table of one condition's runs."""
    dup = frame.duplicated(["student_seed", "metric"], keep=False)
    if dup.any():
        seeds = sorted(frame.loc[dup, "student_seed"].unique().tolist())
        raise ValueError(f"{label}: more than one run per student seed and metric (seeds {seeds})")
    return frame.pivot(index="student_seed", columns="metric", values="value").sort_index()


def _analyse_setting(runs, treatment, setting, design, options: AnalysisOptions) -> SettingResult:
    teacher_seed, alpha, temperature, width = setting
    key = dict(teacher_seed=teacher_seed, alpha=alpha, temperature=temperature, width=width)
    label = f"teacher seed {teacher_seed}, {treatment} alpha={alpha:g}"
    label += "" if math.isnan(temperature) else f", T={temperature:g}"
    label += "" if math.isnan(width) else f", width={width:g}"
    kd = _wide(_select(runs, treatment, key), label)
    controls = _control_tables(runs, key, design.controls, label)
    comparisons = tuple(
        _compare(kd, wide, name, (teacher_seed, treatment, alpha, temperature), width, options)
        for name, wide in controls.items()
    )
    verdict, n_sig, rel, notes = _verdict(comparisons, tuple(design.verdict), options)
    asymmetry, asym_notes = _asymmetry(kd, controls, options)
    notes += _pairing_notes(kd, comparisons, treatment) + asym_notes
    return SettingResult(
        teacher_seed=teacher_seed,
        condition=treatment,
        alpha=alpha,
        temperature=temperature,
        n=len(kd),
        verdict=verdict,
        n_significant=n_sig,
        relative_improvement=rel,
        comparisons=comparisons,
        asymmetry=asymmetry,
        note="; ".join(notes),
        width=width,
        verdict_controls=tuple(design.verdict),
    )


def _control_tables(runs: pd.DataFrame, key, design, label: str) -> dict[str, pd.DataFrame]:
    """The (student seed, metric) table of every control of the design present for a setting."""
    tables = {}
    for name, match in design.items():
        selected = _select(runs, name, key, match)
        if not selected.empty:
            tables[name] = _wide(selected, f"{label}: control {name}")
    return tables


def _compare(kd, control, name, keys, width, options: AnalysisOptions) -> ControlComparison:
    seeds = kd.index.intersection(control.index)
    tests = []
    for metric in options.metrics:
        if metric not in kd.columns or metric not in control.columns:
            continue
        pairs = pd.concat([kd.loc[seeds, metric], control.loc[seeds, metric]], axis=1).dropna()
        if not pairs.empty:
            t, c = pairs.to_numpy().T
            better = better_directions()[metric]
            tests.append(paired_wilcoxon(t, c, better, metric=metric, level=options.alpha_level))
    functional = functional_metrics()
    family = [i for i, t in enumerate(tests) if t.metric in functional]
    adjusted_family = apply_fdr([tests[i] for i in family], options.fdr_q)
    for i, adjusted in zip(family, adjusted_family, strict=True):
        tests[i] = adjusted
    return ControlComparison(*keys, control=name, n=len(seeds), tests=tuple(tests), width=width)


def _verdict(comparisons, verdict_controls, options) -> tuple[str, int, float, list[str]]:
    """Supported when a majority of the functional metrics beat every verdict control."""
    by_name = {c.control: c for c in comparisons}
    missing = [c for c in verdict_controls if c not in by_name]
    reference = verdict_controls[0] if verdict_controls else None
    rel = _relative_improvement(by_name[reference]) if reference in by_name else math.nan
    if missing:
        names = " and ".join(label(m) for m in missing)
        return "not_supported", 0, rel, [f"no {names} runs to compare with: verdict needs both"]
    functional = functional_metrics()
    n_sig = sum(all(_significant(by_name[c], m) for c in verdict_controls) for m in functional)
    if n_sig <= len(functional) / 2:
        return "not_supported", n_sig, rel, []
    if rel < options.marginal_threshold:
        return "marginal", n_sig, rel, []
    undefined = f"relative improvement undefined ({label(reference)} mean 0)"
    return "supported", n_sig, rel, [] if not math.isnan(rel) else [undefined]


def _significant(comparison: ControlComparison, metric: str) -> bool:
    test = comparison.test(metric)
    return test is not None and test.significant


def _relative_improvement(reference: ControlComparison) -> float:
    """Median over functional metrics of the treatment's gain over the reference control
    (the independent model, SIDDO), relative to |reference|."""
    gains = []
    for metric in functional_metrics():
        t = reference.test(metric)
        if t is None or t.mean_control == 0:
            continue
        sign = 1.0 if t.better == "higher" else -1.0
        gains.append(sign * (t.mean_treatment - t.mean_control) / abs(t.mean_control))
    return float(np.median(gains)) if gains else math.nan


def _pairing_notes(kd: pd.DataFrame, comparisons, treatment: str) -> list[str]:
    notes = []
    for c in comparisons:
        if c.n < len(kd):
            notes.append(f"{len(kd) - c.n} {label(treatment)} run(s) without a paired "
                         f"{label(c.control)} run")  # fmt: skip
    return notes


# ----------------------------------------------------------------------------- asymmetry

_AGREEMENT = {"correct": "correct_agreement", "incorrect": "incorrect_agreement"}


def _asymmetry(kd, controls, options: AnalysisOptions) -> tuple[Asymmetry, list[str]]:
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
    label = _asymmetry_label(test.mean_control, test.mean_treatment, options.asymmetry_tolerance)
    return Asymmetry(
        baseline_correct=b_correct,
        baseline_incorrect=b_incorrect,
        delta_correct=test.mean_control,
        delta_incorrect=test.mean_treatment,
        label=label,
        test=test,
        n=len(d),
        student_seeds=tuple(int(s) for s in d.index),
        d_correct=tuple(float(x) for x in d["correct"]),
        d_incorrect=tuple(float(x) for x in d["incorrect"]),
    ), []


def _baselines(candidates, baseline: str) -> tuple[str | None, str | None]:
    """Control B for (delta_correct, delta_incorrect) as PROTOCOL section 6 chooses it."""
    if baseline == "accuracy":
        best = _best_control(candidates, "accuracy")
        return best, best
    return (
        _best_control(candidates, _AGREEMENT["correct"]),
        _best_control(candidates, _AGREEMENT["incorrect"]),
    )


def _best_control(candidates: Mapping[str, pd.DataFrame], metric: str) -> str | None:
    """The control with the highest mean `metric` over its runs; ties go to the design's order."""
    means = {
        name: float(np.nanmean(w[metric])) if metric in w and w[metric].notna().any() else math.nan
        for name, w in candidates.items()
    }
    means = {k: v for k, v in means.items() if not math.isnan(v)}
    return max(means, key=means.__getitem__) if means else None


def _agreement_deltas(kd, b_correct, b_incorrect) -> pd.DataFrame:
    """Per student seed: KD minus baseline agreement, on each teacher bucket."""
    columns = {}
    for bucket, baseline in (("correct", b_correct), ("incorrect", b_incorrect)):
        metric = _AGREEMENT[bucket]
        if metric not in kd or metric not in baseline:
            return pd.DataFrame(columns=["correct", "incorrect"])
        columns[bucket] = kd[metric] - baseline[metric]  # aligned on student_seed
    return pd.DataFrame(columns).dropna().sort_index()


def _asymmetry_label(delta_correct: float, delta_incorrect: float, tolerance: float) -> str:
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


# ----------------------------------------------------------------------------- sweeps

SWEEP_KEYS = ["alpha", "temperature", "width"]
SWEEP_COLUMNS = [*SWEEP_KEYS, "n", "n_teachers", "delta_correct", "sem_correct"]
SWEEP_COLUMNS += ["delta_incorrect", "sem_incorrect", "asymmetry", "sem_asymmetry"]
SWEEP_COLUMNS += ["relative_improvement", "n_transfer"]


def delta_sweep(analysis: Analysis, treatment: str | None = None) -> pd.DataFrame:
    """Agreement deltas per (alpha, T, width) of one treatment (by default the first of the
    analysis, in registry order: KD when present), pooled over
    teacher seeds: mean, SEM and n of the per-seed d_correct, d_incorrect and their
    difference (asymmetry, > 0 negative), each (teacher seed, student seed) pair one value;
    with the mean relative improvement over SIDDO and how many teacher seeds' verdicts found
    transfer (supported or marginal)."""
    treatment = treatment or first_treatment(analysis)
    deltas = analysis.asymmetry_frame()
    deltas = deltas[deltas["condition"] == treatment]
    if deltas.empty:
        return pd.DataFrame(columns=SWEEP_COLUMNS)
    deltas = deltas.assign(asymmetry=deltas["d_incorrect"] - deltas["d_correct"])
    grouped = deltas.groupby(SWEEP_KEYS, dropna=False, sort=True)
    frame = grouped.agg(
        n=("d_correct", "count"),
        n_teachers=("teacher_seed", "nunique"),
        delta_correct=("d_correct", "mean"),
        sem_correct=("d_correct", sem),
        delta_incorrect=("d_incorrect", "mean"),
        sem_incorrect=("d_incorrect", sem),
        asymmetry=("asymmetry", "mean"),
        sem_asymmetry=("asymmetry", sem),
    ).reset_index()
    transfer = _transfer_by_setting(analysis, treatment)
    return frame.merge(transfer, on=SWEEP_KEYS, how="left")[SWEEP_COLUMNS]


def first_treatment(analysis: Analysis) -> str | None:
    """The analysis's first treatment (its settings follow the registry's order)."""
    return analysis.settings[0].condition if analysis.settings else None


def _transfer_by_setting(analysis: Analysis, treatment: str) -> pd.DataFrame:
    verdicts = analysis.verdicts_frame()
    verdicts = verdicts[verdicts["condition"] == treatment]
    verdicts = verdicts.assign(transfer=verdicts["verdict"].isin(["supported", "marginal"]))
    grouped = verdicts.groupby(SWEEP_KEYS, dropna=False, sort=True)
    return grouped.agg(
        relative_improvement=("relative_improvement", "mean"), n_transfer=("transfer", "sum")
    ).reset_index()


# ----------------------------------------------------------------------------- equal conditions


def equivalence_columns(a: str, b: str) -> list[str]:
    columns = ["teacher_seed", "alpha", "width", "metric", "n", "max_abs_paired_diff"]
    return columns + [f"mean_{a}", f"mean_{b}", "abs_mean_diff"]


def equivalence_differences(
    runs: pd.DataFrame, a: str, b: str, b_at: Sequence[tuple[str, float]] = ()
) -> pd.DataFrame:
    """Condition `a` against `b`, which it equals up to a constant at `b`'s params `b_at`
    (label smoothing at epsilon = alpha and RCD at the same alpha and T = 1): per (teacher
    seed, alpha, width, metric), over the student seeds both have, the largest |a - b| of a
    paired run and |mean a - mean b|."""
    runs = with_width(runs)
    first = runs[runs["condition"] == a]
    second = runs[runs["condition"] == b]
    for param, value in b_at:
        second = second[np.isclose(second[param], value)]
    keys = ["teacher_seed", "alpha", "width", "student_seed", "metric"]
    pairs = first[[*keys, "value"]].merge(second[[*keys, "value"]], on=keys, suffixes=("_a", "_b"))
    pairs = pairs[~pairs["metric"].str.startswith("n_teacher")]  # the teacher's, not the run's
    columns = equivalence_columns(a, b)
    if pairs.empty:
        return pd.DataFrame(columns=columns)
    pairs = pairs.assign(abs_diff=(pairs["value_a"] - pairs["value_b"]).abs())
    grouped = pairs.groupby([k for k in keys if k != "student_seed"], dropna=False, sort=True)
    frame = grouped.agg(
        n=("abs_diff", "count"),
        max_abs_paired_diff=("abs_diff", "max"),
        mean_a=("value_a", "mean"),
        mean_b=("value_b", "mean"),
    ).reset_index()
    frame["abs_mean_diff"] = (frame["mean_a"] - frame["mean_b"]).abs()
    return frame.rename(columns={"mean_a": f"mean_{a}", "mean_b": f"mean_{b}"})[columns]


# ----------------------------------------------------------------------------- targeted

TARGETED_KEYS = ["teacher_seed", "condition", "alpha", "temperature", "width", "completion"]


def targeted_summary(counts: pd.DataFrame) -> pd.DataFrame:
    """Mean, SEM and n over runs of the prompt-completion counts (kdaudit.store.tables.targeted_counts)
    per (teacher seed, condition, alpha, T, width, completion); a teacher is one run."""
    counts = with_width(counts).assign(count=counts["count"].astype(np.float64))
    grouped = counts.groupby(TARGETED_KEYS, dropna=False, sort=True)["count"]
    frame = grouped.agg(mean="mean", sem=sem, n="count").reset_index()
    keys = TARGETED_KEYS[:-1]
    # one row per run group; every completion is counted in the same runs: one n per row
    wide = frame.drop_duplicates(keys)[[*keys, "n"]]
    for completion, part in frame.groupby("completion", sort=False):
        part = part[[*keys, "mean", "sem"]]
        names = {"mean": f"{completion}_mean", "sem": f"{completion}_sem"}
        wide = wide.merge(part.rename(columns=names), on=keys, how="left")
    return wide.reset_index(drop=True)
