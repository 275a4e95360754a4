"""Paired statistics for the transfer decision (PROTOCOL sections 5, 6 and 10).

Input is the tidy run table, one row per run per metric. A *setting* is one
(teacher_seed, alpha, temperature, width, teacher_label_noise) of a treatment condition; its
runs are paired with the runs of each of its controls at the same grid axes (AXES: student
width, teacher label noise) by student seed, which is what makes the Wilcoxon signed-rank
tests paired. Which controls a treatment has, and which setting parameters each shares with
it, is a `Designs` table passed in (by default the condition registry's,
kdaudit.conditions.designs()). A parameter a condition does not have
(a feature-map treatment's temperature) is NaN. The metrics, their better directions and
which of them are functional come from the metric registry (kdaudit.metrics). The grid axes
are optional columns: a table without `width` (capacity grids) is one width, NaN; without
`teacher_label_noise` (the teacher-error sweep) one clean teacher, 0.0.

Per setting: the paired tests against every control (with effect sizes and estimates,
kdaudit.stats.paired), the transfer verdict, the paper's asymmetry label and the robust one
from the asymmetry matrix (kdaudit.stats.asymmetry). `Analysis.pooled` repeats the analysis
per setting over all (teacher seed, student seed) pairs when there are several teachers.
Everything here computes at full precision; rounding and formatting belong to the report.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from kdaudit.conditions import Designs, label
from kdaudit.conditions import designs as registered_designs
from kdaudit.config import AnalysisOptions
from kdaudit.metrics import better_directions, functional_metrics
from kdaudit.stats.asymmetry import (
    ASYMMETRY_COLUMNS,
    MATRIX_COLUMNS,
    ROBUST_LABELS,
    Asymmetry,
    AsymmetryCell,
    asymmetry_matrix,
    cell_row,
    paper_asymmetry,
    robust_label,
)
from kdaudit.stats.paired import (
    DIRECTIONS,
    FDR_METHODS,
    PairedTest,
    apply_fdr,
    benjamini_hochberg,
    min_pairs,
    paired_wilcoxon,
    reachable,
    sem,
)

__all__ = [
    "DIRECTIONS", "FDR_METHODS", "ROBUST_LABELS", "Analysis", "AnalysisOptions", "Asymmetry",
    "AsymmetryCell", "ControlComparison", "PairedTest", "SettingResult", "analyse", "apply_fdr",
    "benjamini_hochberg", "paired_wilcoxon", "sem",
]  # fmt: skip

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
# Grid axes beyond (alpha, T), each a column a run table may lack (runs stored before the
# axis, other grids): its value there. A setting, and each of its controls, is one value of
# every axis.
AXES = {"width": math.nan, "teacher_label_noise": 0.0}
SETTING_KEYS = ("teacher_seed", "condition", "alpha", "temperature", *AXES)
POOLED = -1  # the teacher seed of a setting pooled over teacher seeds


BASELINES = ("accuracy", "agreement")
VERDICTS = ("supported", "marginal", "not_supported", "insufficient_n")
TRANSFER = ("supported", "marginal")  # the verdicts that found transfer
ASYMMETRY_LABELS = ("negative", "symmetric", "positive", "undetermined")  # the paper's


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
    teacher_label_noise: float = 0.0  # the teacher's label-noise rate (teacher-error sweep)

    def test(self, metric: str) -> PairedTest | None:
        return next((t for t in self.tests if t.metric == metric), None)

    def to_frame(self) -> pd.DataFrame:
        keys = {**setting_keys(self), "control": self.control}
        return pd.DataFrame([{**keys, **asdict(t)} for t in self.tests], columns=_TEST_COLUMNS)


_TEST_COLUMNS = [*SETTING_KEYS, "control", *(f for f in PairedTest.__dataclass_fields__)]


@dataclass(frozen=True)
class SettingResult:
    teacher_seed: int  # POOLED for a setting pooled over teacher seeds
    condition: str
    alpha: float
    temperature: float
    n: int  # treatment runs of this setting
    verdict: str  # supported | marginal | not_supported | insufficient_n
    n_significant: int  # functional metrics significant vs every verdict control
    relative_improvement: float  # median over functional metrics vs the reference, + = better
    comparisons: tuple[ControlComparison, ...]
    paper_asymmetry: Asymmetry  # the paper's view: one baseline B, raw, point estimates
    matrix: tuple[AsymmetryCell, ...] = ()  # every control present x (raw, headroom)
    asymmetry: str = "undetermined"  # the robust label (ROBUST_LABELS)
    asymmetry_why: str = ""  # baseline-dependent: the cells that disagree
    note: str = ""
    width: float = math.nan  # student width fraction (capacity grids)
    teacher_label_noise: float = 0.0  # the teacher's label-noise rate (teacher-error sweep)
    verdict_controls: tuple[str, ...] = ()  # the controls the verdict needs, reference first
    asymmetry_controls: tuple[str, ...] = ()  # the controls the robust label needs
    seeds_needed: float = math.nan  # pairs that would detect the observed transfer (planning)
    n_teachers: int = 1  # teacher seeds pooled (POOLED settings)
    teacher_verdicts: Mapping[str, int] | None = None  # pooled: verdict counts per teacher

    def comparison(self, control: str) -> ControlComparison | None:
        return next((c for c in self.comparisons if c.control == control), None)

    def cells(self, controls: Sequence[str] | None = None) -> tuple[AsymmetryCell, ...]:
        """The matrix cells of `controls` (default: the robust label's)."""
        controls = self.asymmetry_controls if controls is None else controls
        return tuple(c for c in self.matrix if c.control in controls)

    @property
    def transfer_found(self) -> bool:
        return self.verdict in TRANSFER

    def to_frame(self) -> pd.DataFrame:
        a = self.paper_asymmetry
        row = dict(
            **setting_keys(self),
            n=self.n,
            verdict=self.verdict,
            n_significant=self.n_significant,
            relative_improvement=self.relative_improvement,
            asymmetry=self.asymmetry,
            paper_asymmetry=a.label,
            delta_correct=a.delta_correct,
            delta_incorrect=a.delta_incorrect,
            best_control=a.best_control,
            asymmetry_p=a.pvalue,
            seeds_needed=self.seeds_needed,
            asymmetry_why=self.asymmetry_why,
            note=self.note,
        )
        return pd.DataFrame([row], columns=VERDICT_COLUMNS)

    def matrix_frame(self) -> pd.DataFrame:
        keys = setting_keys(self)
        return pd.DataFrame([{**keys, **cell_row(c)} for c in self.matrix],
                            columns=[*SETTING_KEYS, *MATRIX_COLUMNS])  # fmt: skip


def setting_keys(result) -> dict:
    """A setting's (or comparison's) SETTING_KEYS values, by name."""
    return {k: getattr(result, k) for k in SETTING_KEYS}


VERDICT_COLUMNS = [*SETTING_KEYS, "n", "verdict", "n_significant", "relative_improvement"]
VERDICT_COLUMNS += ["asymmetry", "paper_asymmetry", "delta_correct", "delta_incorrect"]
VERDICT_COLUMNS += ["best_control", "asymmetry_p", "seeds_needed", "asymmetry_why", "note"]


@dataclass(frozen=True)
class Analysis:
    settings: tuple[SettingResult, ...]
    options: AnalysisOptions
    pooled: tuple[SettingResult, ...] = ()  # per setting over teacher seeds, when several

    def verdicts_frame(self) -> pd.DataFrame:
        """One row per setting."""
        return _concat([s.to_frame() for s in self.settings], VERDICT_COLUMNS)

    def tests_frame(self) -> pd.DataFrame:
        """One row per (setting, control, metric)."""
        frames = [c.to_frame() for s in self.settings for c in s.comparisons]
        return _concat(frames, _TEST_COLUMNS)

    def asymmetry_frame(self) -> pd.DataFrame:
        """Per-seed agreement deltas of the paper's view, one row per (setting, student seed)."""
        frames = [_with_keys(s.paper_asymmetry.to_frame(), s) for s in self.settings]
        return _concat(frames, [*SETTING_KEYS, *ASYMMETRY_COLUMNS])

    def matrix_frame(self, pooled: bool = False) -> pd.DataFrame:
        """One row per (setting, control, scale): the asymmetry matrix."""
        settings = self.pooled if pooled else self.settings
        return _concat([s.matrix_frame() for s in settings], [*SETTING_KEYS, *MATRIX_COLUMNS])

    def to_frame(self) -> pd.DataFrame:
        return self.verdicts_frame()


def _with_keys(frame: pd.DataFrame, s: SettingResult) -> pd.DataFrame:
    return frame.assign(**setting_keys(s))


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


# ----------------------------------------------------------------------------- summaries


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, SEM and n per (SETTING_KEYS, metric)."""
    check_columns(runs)
    keys = [*SETTING_KEYS, "metric"]
    values = with_axes(runs).assign(value=runs["value"].astype(np.float64))
    grouped = values.groupby(keys, dropna=False, sort=True)["value"]
    return grouped.agg(mean="mean", sem=sem, n="count").reset_index()


def with_axes(runs: pd.DataFrame) -> pd.DataFrame:
    """The run table with a float column per grid axis (AXES), at its default where absent."""
    missing = {axis: value for axis, value in AXES.items() if axis not in runs.columns}
    return runs.assign(**missing).astype({axis: np.float64 for axis in AXES})


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
    """Test every treatment setting against its paired controls and decide the verdicts; with
    several teacher seeds, the same per setting over all (teacher seed, student seed) pairs."""
    check_columns(runs)
    designs = registered_designs() if designs is None else designs
    _check_options(options, designs)
    runs = with_axes(runs).assign(value=runs["value"].astype(np.float64))
    settings = _analyse_all(runs, designs, options)
    pooled = ()
    if runs["teacher_seed"].nunique() > 1:
        pooled = tuple(_pool(p, settings) for p in _analyse_all(_pooled(runs), designs, options))
    return Analysis(tuple(settings), options, pooled)


def _analyse_all(runs: pd.DataFrame, designs: Designs, options) -> list[SettingResult]:
    return [
        _analyse_setting(runs, treatment, key, controls, options)
        for treatment, controls in designs.items()
        for key in _treatment_settings(runs, treatment)
    ]


def _pooled(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs as one teacher (POOLED) whose pairs are (teacher seed, student seed)."""
    pairs = runs["teacher_seed"].astype(int).astype(str) + ":" + runs["student_seed"].astype(str)
    return runs.assign(student_seed=pairs, teacher_seed=POOLED)


def _pool(pooled: SettingResult, settings: Sequence[SettingResult]) -> SettingResult:
    """A pooled setting with the count of teacher seeds and of their verdicts."""
    same = [s for s in settings if s.condition == pooled.condition and same_setting(s, pooled)]
    verdicts = dict(Counter(s.verdict for s in same))
    return replace(pooled, n_teachers=len(same), teacher_verdicts=verdicts)


def same_setting(a: SettingResult, b: SettingResult) -> bool:
    """The same (alpha, T, AXES), whatever the teacher seed and condition; NaN equals NaN."""
    return all(
        (math.isnan(x) and math.isnan(y)) or math.isclose(x, y)
        for x, y in ((getattr(a, k), getattr(b, k)) for k in ("alpha", "temperature", *AXES))
    )


def known_controls(designs: Designs) -> tuple[str, ...]:
    """Every control of the designs, in order of first appearance."""
    return tuple(dict.fromkeys(c for d in designs.values() for c in d.controls))


def _check_options(options: AnalysisOptions, designs: Designs) -> None:
    if options.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {options.baseline!r}")
    if options.fdr_method not in FDR_METHODS:
        raise ValueError(f"fdr_method must be one of {FDR_METHODS}, got {options.fdr_method!r}")
    known = known_controls(designs)
    for key in ("exclude_controls", "asymmetry_controls"):
        unknown = [c for c in getattr(options, key) if c not in known]
        if unknown:
            raise ValueError(f"{key} has unknown controls {unknown}; known: {known}")
    better = better_directions()
    unknown = [m for m in options.metrics if m not in better]
    if unknown:
        raise ValueError(f"metrics has unknown metrics {unknown}; known: {sorted(better)}")


def _treatment_settings(runs: pd.DataFrame, treatment: str) -> list[dict]:
    """The key (teacher seed, alpha, temperature, AXES) of every setting of `treatment`."""
    columns = ["teacher_seed", *reversed(AXES), "alpha", "temperature"]
    rows = runs.loc[runs["condition"] == treatment, columns].astype(
        {"alpha": np.float64, "temperature": np.float64}
    )
    rows = rows.drop_duplicates().sort_values(columns)
    return [{k: int(v) if k == "teacher_seed" else float(v) for k, v in row.items()}
            for row in rows.to_dict(orient="records")]  # fmt: skip


def select_runs(
    runs: pd.DataFrame, condition: str, key: Mapping[str, float], match=("alpha", "temperature")
) -> pd.DataFrame:
    """The runs of `condition` in setting `key`, matched on the columns `match`."""
    mask = (runs["condition"] == condition) & (runs["teacher_seed"] == key["teacher_seed"])
    for column in (*match, *AXES):
        # float settings come from configs: compare with a tolerance. NaN (a parameter the
        # condition lacks, the width outside capacity grids) matches NaN only.
        mask &= np.isclose(runs[column].astype(np.float64), key[column], rtol=1e-9, atol=1e-12,
                           equal_nan=True)  # fmt: skip
    return runs[mask]


def wide_table(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """(student seeds, metrics) table of one condition's runs."""
    dup = frame.duplicated(["student_seed", "metric"], keep=False)
    if dup.any():
        seeds = sorted(frame.loc[dup, "student_seed"].unique().tolist())
        raise ValueError(f"{label}: more than one run per student seed and metric (seeds {seeds})")
    return frame.pivot(index="student_seed", columns="metric", values="value").sort_index()


def _analyse_setting(runs, treatment, key: dict, design, options: AnalysisOptions) -> SettingResult:
    teacher_seed, alpha, temperature = key["teacher_seed"], key["alpha"], key["temperature"]
    axes = {axis: key[axis] for axis in AXES}
    name = f"{_where(teacher_seed)}, {treatment} alpha={alpha:g}"
    name += "" if math.isnan(temperature) else f", T={temperature:g}"
    name += "".join(f", {k}={v:g}" for k, v in axes.items() if not _at_default(k, v))
    kd = wide_table(select_runs(runs, treatment, key), name)
    controls = _control_tables(runs, key, design.controls, name)
    keys = dict(teacher_seed=teacher_seed, condition=treatment, alpha=alpha,
                temperature=temperature, **axes)  # fmt: skip
    comparisons = tuple(_compare(kd, wide, c, keys, options) for c, wide in controls.items())
    verdict_controls = tuple(design.verdict)
    verdict, n_sig, rel, notes = _verdict(comparisons, verdict_controls, options)
    paper, asym_notes = paper_asymmetry(kd, controls, options)
    matrix = asymmetry_matrix(kd, controls, options)
    asymmetry_controls = tuple(options.asymmetry_controls) or verdict_controls
    robust, why = robust_label(matrix, asymmetry_controls)
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
        paper_asymmetry=paper,
        matrix=matrix,
        asymmetry=robust,
        asymmetry_why=why,
        note="; ".join(notes),
        **axes,
        verdict_controls=verdict_controls,
        asymmetry_controls=asymmetry_controls,
        seeds_needed=_seeds_needed(comparisons, verdict_controls),
    )


def _where(teacher_seed: int) -> str:
    return "teachers pooled" if teacher_seed == POOLED else f"teacher seed {teacher_seed}"


def _at_default(axis: str, value: float) -> bool:
    default = AXES[axis]
    return (math.isnan(default) and math.isnan(value)) or value == default


def _control_tables(runs: pd.DataFrame, key, design, label: str) -> dict[str, pd.DataFrame]:
    """The (student seed, metric) table of every control of the design present for a setting."""
    tables = {}
    for name, match in design.items():
        selected = select_runs(runs, name, key, match)
        if not selected.empty:
            tables[name] = wide_table(selected, f"{label}: control {name}")
    return tables


def _compare(kd, control, name, keys: dict, options: AnalysisOptions) -> ControlComparison:
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
    adjusted = apply_fdr([tests[i] for i in family], options.fdr_q, options.fdr_method)
    for i, test in zip(family, adjusted, strict=True):
        tests[i] = test
    return ControlComparison(**keys, control=name, n=len(seeds), tests=tuple(tests))


def _verdict(comparisons, verdict_controls, options) -> tuple[str, int, float, list[str]]:
    """Supported when a majority of the functional metrics beat every verdict control;
    insufficient_n when the pairs with some verdict control are too few for any outcome to
    reach the FDR level."""
    by_name = {c.control: c for c in comparisons}
    missing = [c for c in verdict_controls if c not in by_name]
    reference = verdict_controls[0] if verdict_controls else None
    rel = _relative_improvement(by_name[reference]) if reference in by_name else math.nan
    if missing:
        names = " and ".join(label(m) for m in missing)
        return "not_supported", 0, rel, [f"no {names} runs to compare with: verdict needs both"]
    functional = functional_metrics()
    n_sig = sum(all(_significant(by_name[c], m) for c in verdict_controls) for m in functional)
    family = len(functional)
    short = [c for c in verdict_controls
             if not reachable(by_name[c].n, options.fdr_q, family, options.fdr_method)]  # fmt: skip
    if short:
        need = min_pairs(options.fdr_q)
        pairs = ", ".join(f"{by_name[c].n} with {label(c)}" for c in short)
        return "insufficient_n", n_sig, rel, [f"{pairs} paired seed(s): no outcome can reach "
                                             f"q={options.fdr_q:g} below {need}"]  # fmt: skip
    if n_sig <= len(functional) / 2:
        return "not_supported", n_sig, rel, []
    if rel < options.marginal_threshold:
        return "marginal", n_sig, rel, []
    undefined = f"relative improvement undefined ({label(reference)} mean 0)"
    return "supported", n_sig, rel, [] if not math.isnan(rel) else [undefined]


def _seeds_needed(comparisons, verdict_controls) -> float:
    """Pairs at which a majority of the functional metrics would each detect the observed
    effect against every verdict control (planning figure: see paired.seeds_needed)."""
    by_name = {c.control: c for c in comparisons}
    if not verdict_controls or any(c not in by_name for c in verdict_controls):
        return math.nan
    per_metric = []
    for metric in functional_metrics():
        tests = [by_name[c].test(metric) for c in verdict_controls]
        if any(t is None for t in tests):
            continue
        per_metric.append(max(t.seeds_needed for t in tests))
    majority = len(functional_metrics()) // 2 + 1
    if len(per_metric) < majority:
        return math.nan
    return float(sorted(per_metric)[majority - 1])


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


# ----------------------------------------------------------------------------- sweeps

SWEEP_KEYS = ["alpha", "temperature", *AXES]
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
    columns = ["teacher_seed", "alpha", *AXES, "metric", "n", "max_abs_paired_diff"]
    return columns + [f"mean_{a}", f"mean_{b}", "abs_mean_diff"]


def equivalence_differences(
    runs: pd.DataFrame, a: str, b: str, b_at: Sequence[tuple[str, float]] = ()
) -> pd.DataFrame:
    """Condition `a` against `b`, which it equals up to a constant at `b`'s params `b_at`
    (label smoothing at epsilon = alpha and RCD at the same alpha and T = 1): per (teacher
    seed, alpha, width, metric), over the student seeds both have, the largest |a - b| of a
    paired run and |mean a - mean b|."""
    runs = with_axes(runs)
    first = runs[runs["condition"] == a]
    second = runs[runs["condition"] == b]
    for param, value in b_at:
        second = second[np.isclose(second[param], value)]
    keys = ["teacher_seed", "alpha", *AXES, "student_seed", "metric"]
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

TARGETED_KEYS = [*SETTING_KEYS, "completion"]


def targeted_summary(counts: pd.DataFrame) -> pd.DataFrame:
    """Mean, SEM and n over runs of the prompt-completion counts (kdaudit.store.tables.targeted_counts)
    per (teacher seed, condition, alpha, T, width, completion); a teacher is one run."""
    counts = with_axes(counts).assign(count=counts["count"].astype(np.float64))
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
