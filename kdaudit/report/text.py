"""Plain sentences: one verdict per setting, and the protocol decisions behind them."""

from __future__ import annotations

from kdaudit.conditions import CONDITIONS, condition
from kdaudit.metrics import functional_metrics
from kdaudit.report import fmt
from kdaudit.stats import Analysis, AnalysisOptions, Asymmetry, SettingResult

ASYMMETRY_TEXT = {
    "negative": "negative asymmetric: the student copied the teacher's mistakes more than "
    "its correct behaviour",
    "positive": "positive asymmetric: the student gained more agreement on the teacher's "
    "correct predictions than on its mistakes",
    "symmetric": "symmetric: the student gained about as much agreement on the teacher's "
    "mistakes as on its correct predictions",
}


def verdict_lines(analysis: Analysis) -> list[str]:
    """One plain sentence per setting, as printed at the end of a run."""
    return [verdict_sentence(s, analysis.options) for s in analysis.settings]


def verdict_sentence(s: SettingResult, options: AnalysisOptions) -> str:
    setting = fmt.setting_text(s.alpha, s.temperature, s.width)
    head = f"Teacher seed {s.teacher_seed}, {fmt.control_name(s.condition)} {setting}"
    return f"{head}: {_transfer(s, options)}; {_asymmetry(s.asymmetry, s.n, options)}."


def _transfer(s: SettingResult, options: AnalysisOptions) -> str:
    missing = [fmt.control_name(c) for c in s.verdict_controls if s.comparison(c) is None]
    if missing:
        return f"transfer not supported (no {' or '.join(missing)} runs to compare with, n={s.n})"
    controls = " and ".join(fmt.control_name(c) for c in s.verdict_controls)
    reference = fmt.control_name(s.verdict_controls[0]) if s.verdict_controls else "?"
    evidence = (
        f"{s.n_significant}/{len(functional_metrics())} functional metrics significant vs "
        f"{controls}, median improvement {fmt.pct(s.relative_improvement)} over {reference}"
    )
    if s.verdict == "marginal":
        evidence += f", below the {fmt.pct(options.marginal_threshold)} threshold"
    return f"transfer {s.verdict.replace('_', ' ')} ({evidence}, n={s.n})"


def _asymmetry(a: Asymmetry, n: int, options: AnalysisOptions) -> str:
    if a.label not in ASYMMETRY_TEXT:
        return "asymmetry undetermined (no control or agreement data to compare with)"
    if a.test is None or a.test.all_zero:
        p = "one-sided Wilcoxon undefined: every per-seed difference is zero"
    else:
        verdict = "significant" if a.test.significant else "not significant, a point estimate only"
        p = f"one-sided Wilcoxon p={fmt.pval(a.test.pvalue)}, {verdict} at {options.alpha_level:g}"
    n_text = "" if a.n == n else f", n={a.n}"
    baseline = fmt.baseline_name(a.baseline_correct, a.baseline_incorrect)
    return (
        f"{ASYMMETRY_TEXT[a.label]} (Δcorrect {fmt.signed(a.delta_correct)}, "
        f"Δincorrect {fmt.signed(a.delta_incorrect)} vs {baseline}, {p}{n_text})"
    )


def protocol_notes(options: AnalysisOptions, treatments=frozenset()) -> list[str]:
    """The decisions behind the verdicts, with the options in force, and the note of each
    treatment present (from its registry entry)."""
    functional = functional_metrics()
    excluded = ", ".join(fmt.control_name(c) for c in options.exclude_controls) or "none"
    baseline = (
        "the control with the highest mean test accuracy"
        if options.baseline == "accuracy"
        else "per bucket, the control with the highest mean agreement in that bucket"
    )
    return [
        "Runs are paired by student seed (same minibatch order); only seeds present in both "
        "conditions enter a test.",
        "Tests: one-sided Wilcoxon signed-rank on paired differences (scipy, method='auto': "
        "exact or exhaustive-permutation null at n=10) in each metric's better direction; "
        "zero differences are dropped before ranking; all-zero differences are reported as "
        "such, never as p=1.",
        f"Benjamini-Hochberg FDR at q={options.fdr_q:g} over the "
        f"{len(functional)} functional metrics "
        f"({', '.join(fmt.metric_label(m, arrow=False) for m in functional)}) within "
        f"each (teacher seed, setting, control) family; other metrics at "
        f"{options.alpha_level:g} uncorrected.",
        *_treatment_notes(treatments),
        f"Marginal: supported, but the median relative improvement of the functional metrics "
        f"over SIDDO is below {fmt.pct(options.marginal_threshold)}.",
        f"Asymmetry: Δ = agreement(KD) − agreement(B) on teacher-correct and teacher-incorrect "
        f"test examples, B = {baseline} (excluded: {excluded}); symmetric within "
        f"±{options.asymmetry_tolerance:g}; tested with a one-sided Wilcoxon test of the "
        f"per-seed Δincorrect − Δcorrect (greater) at {options.alpha_level:g}.",
    ]


def _treatment_notes(treatments) -> list[str]:
    """Each present treatment's note, in registry order."""
    return [c.note for c in CONDITIONS.entries() if c.name in treatments and c.note]


def equivalence_sentence(frame, a: str) -> str:
    """The largest difference of condition `a` from the one it equals, over every metric,
    alpha and teacher seed, paired and between means (`frame`: stats.equivalence_differences)."""
    paired = frame.loc[frame["max_abs_paired_diff"].idxmax()]
    means = frame.loc[frame["abs_mean_diff"].idxmax()]
    return (
        f"{condition(a).equals_note}: the largest difference of any metric on a paired run is "
        f"{fmt.num(paired['max_abs_paired_diff'], 3)} ({_where(paired)}); between the means "
        f"over seeds it is {fmt.num(means['abs_mean_diff'], 3)} ({_where(means)})."
    )


def _where(row) -> str:
    width = "" if fmt.is_missing(row["width"]) else f", width {row['width']:g}"
    return (f"{fmt.metric_label(row['metric'], arrow=False)}, α={row['alpha']:g}, teacher seed "
            f"{row['teacher_seed']}{width}, n={int(row['n'])} pairs")  # fmt: skip
