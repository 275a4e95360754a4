"""Plain sentences: one verdict per setting, and the protocol decisions behind them."""

from __future__ import annotations

import math

import numpy as np

from kdaudit.conditions import CONDITIONS, condition
from kdaudit.metrics import functional_metrics
from kdaudit.report import fmt
from kdaudit.stats import POOLED, Analysis, AnalysisOptions, Asymmetry, SettingResult
from kdaudit.stats.paired import min_pairs

ROBUST_TEXT = {
    "negative": "the student copied the teacher's mistakes more than its correct behaviour",
    "positive": "positive asymmetric: the student gained more agreement on the teacher's "
    "correct predictions than on its mistakes",
    "symmetric": "symmetric: the student gained about as much agreement on the teacher's "
    "mistakes as on its correct predictions",
}
FDR_NAMES = {"bh": "Benjamini-Hochberg", "by": "Benjamini-Yekutieli"}
HEADLINE_METRIC = "prediction_disagreement"  # the effect quoted in a sentence, when present


def verdict_lines(analysis: Analysis) -> list[str]:
    """One plain sentence per setting, as printed at the end of a run; then one per setting
    pooled over teacher seeds."""
    lines = [verdict_sentence(s, analysis.options) for s in analysis.settings]
    return lines + [verdict_sentence(s, analysis.options) for s in analysis.pooled]


def verdict_sentence(s: SettingResult, options: AnalysisOptions) -> str:
    return f"{_head(s)}: {verdict_evidence(s, options)}."


def verdict_evidence(s: SettingResult, options: AnalysisOptions) -> str:
    """The tests behind a verdict, without the setting it belongs to."""
    return f"{_transfer(s, options)}; {_asymmetry(s, options)}"


def _head(s: SettingResult) -> str:
    setting = fmt.setting_of(s)
    if s.teacher_seed == POOLED:
        counts = ", ".join(
            f"{n} {v.replace('_', ' ')}" for v, n in (s.teacher_verdicts or {}).items()
        )
        head = f"{s.n_teachers} teacher seeds pooled ({counts}), {fmt.control_name(s.condition)}"
        head += f" {setting}"
    else:
        head = f"Teacher seed {s.teacher_seed}, {fmt.control_name(s.condition)} {setting}"
    return head


def _transfer(s: SettingResult, options: AnalysisOptions) -> str:
    missing = [fmt.control_name(c) for c in s.verdict_controls if s.comparison(c) is None]
    if missing:
        return f"transfer not supported (no {' or '.join(missing)} runs to compare with, n={s.n})"
    if s.verdict == "insufficient_n":
        need = "" if fmt.is_missing(s.seeds_needed) else _need(s.seeds_needed)
        return (f"no verdict, too few paired seeds ({s.note.split(';')[0]}{need}); these "
                "numbers are not evidence either way")  # fmt: skip
    controls = " and ".join(fmt.control_name(c) for c in s.verdict_controls)
    reference = fmt.control_name(s.verdict_controls[0]) if s.verdict_controls else "?"
    evidence = (
        f"{s.n_significant}/{len(functional_metrics())} functional metrics significant vs "
        f"{controls}{_effects(s)}, median improvement {fmt.pct(s.relative_improvement)} over "
        f"{reference}"
    )
    if s.verdict == "marginal":
        evidence += f", below the {fmt.pct(options.marginal_threshold)} threshold"
    if s.verdict == "not_supported" and not fmt.is_missing(s.seeds_needed):
        evidence += _need(s.seeds_needed)
    return f"transfer {s.verdict.replace('_', ' ')} ({evidence}, n={s.n})"


def _need(n: float) -> str:
    if math.isinf(n):
        return "; the observed effect points away from the teacher: no n would show transfer"
    return f"; about {int(n)} paired seeds would detect the observed effect"


def _effects(s: SettingResult) -> str:
    """'; rank-biserial r 1.00 vs SIDDO, 0.96 vs RCD (median over functional metrics);
    prediction disagreement −0.031 [−0.040, −0.022] vs SIDDO'"""
    rs = []
    for c in s.verdict_controls:
        sizes = [t.effect_size for t in s.comparison(c).tests if t.metric in functional_metrics()]
        sizes = [r for r in sizes if not fmt.is_missing(r)]
        if sizes:
            rs.append(f"{float(np.median(sizes)):.2f} vs {fmt.control_name(c)}")
    text = f"; effect size (rank-biserial, median) {', '.join(rs)}" if rs else ""
    reference = s.comparison(s.verdict_controls[0])
    test = reference.test(HEADLINE_METRIC) if reference else None
    if test is not None and not fmt.is_missing(test.estimate):
        text += (f"; {fmt.metric_label(HEADLINE_METRIC, arrow=False)} "
                 f"{fmt.signed(test.estimate)} {_interval(test.ci_low, test.ci_high)} vs "
                 f"{fmt.control_name(reference.control)}")  # fmt: skip
    return text


def _interval(low: float, high: float) -> str:
    return fmt.interval(low, high, unbounded="[unbounded at this n]")


def _asymmetry(s: SettingResult, options: AnalysisOptions) -> str:
    controls = " and ".join(fmt.control_name(c) for c in s.asymmetry_controls)
    paper = _paper(s.paper_asymmetry, options)
    label = s.asymmetry
    if label == "baseline-dependent":
        return f"what transferred depends on the baseline: {s.asymmetry_why} ({paper})"
    if label == "undetermined":
        why = s.asymmetry_why or "no one-sided test significant and intervals too wide to " \
              "call it symmetric"  # fmt: skip
        return f"asymmetry undetermined ({why}; {paper})"
    weakest = _weakest(s)
    where = f"vs {controls} on both scales; weakest: {weakest}"
    if label == "negative" and not s.transfer_found:
        return (f"agreement grew more on the teacher's mistakes than on its correct predictions "
                f"({where}), but transfer is not supported, so this does not show that the "
                f"student copied the teacher ({paper})")  # fmt: skip
    return f"{ROBUST_TEXT[label]} ({where}; {paper})"


def _weakest(s: SettingResult) -> str:
    """The cell of the robust label's controls with the largest p in its label's direction."""
    cells = s.cells()
    key = "p_positive" if s.asymmetry == "positive" else "p_negative"
    if s.asymmetry == "symmetric":
        cell = max(cells, key=lambda c: max(abs(c.difference_ci[0]), abs(c.difference_ci[1])))
        p = ""
    else:
        # ties in p (the exact minimum): the interval nearest zero
        toward = 0 if s.asymmetry == "negative" else 1
        sign = -1.0 if toward == 0 else 1.0
        cell = max(cells, key=lambda c: (getattr(c, key), sign * c.difference_ci[toward]))
        p = f", p={fmt.pval(getattr(cell, key))}"
    return (f"vs {fmt.control_name(cell.control)} ({cell.scale}) Δincorrect − Δcorrect "
            f"{fmt.signed(cell.difference)} {_interval(*cell.difference_ci)}{p}")  # fmt: skip


def _paper(a: Asymmetry, options: AnalysisOptions) -> str:
    if a.label not in ("negative", "positive", "symmetric"):
        return "the paper's single-baseline label: undetermined"
    if a.test is None or a.test.all_zero:
        p = "every per-seed difference zero"
    else:
        p = f"p={fmt.pval(a.test.pvalue)}"
    baseline = fmt.baseline_name(a.baseline_correct, a.baseline_incorrect)
    return (f"the paper's single-baseline label: {a.label}, Δcorrect "
            f"{fmt.signed(a.delta_correct)} and Δincorrect {fmt.signed(a.delta_incorrect)} vs "
            f"{baseline}, {p}")  # fmt: skip


def protocol_notes(options: AnalysisOptions, treatments=frozenset()) -> list[str]:
    """The decisions behind the verdicts, with the options in force, and the note of each
    treatment present (from its registry entry)."""
    functional = functional_metrics()
    excluded = ", ".join(fmt.control_name(c) for c in options.exclude_controls) or "none"
    robust = (", ".join(fmt.control_name(c) for c in options.asymmetry_controls)
              or "each treatment's verdict controls (SIDDO and RCD for KD)")  # fmt: skip
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
        f"{FDR_NAMES[options.fdr_method]} FDR at q={options.fdr_q:g} over the "
        f"{len(functional)} functional metrics "
        f"({', '.join(fmt.metric_label(m, arrow=False) for m in functional)}) within "
        f"each (teacher seed, setting, control) family; other metrics at "
        f"{options.alpha_level:g} uncorrected.",
        f"Insufficient n: a one-sided exact Wilcoxon test of n pairs cannot give p below "
        f"2^-n, so with fewer than {min_pairs(options.fdr_q)} paired seeds (more under "
        "Benjamini-Yekutieli) no outcome reaches the level and the verdict is insufficient_n, "
        "never 'not supported'. 'Paired seeds needed' is a planning figure from the observed "
        "mean and spread (normal approximation, 80% power, Wilcoxon efficiency 3/π).",
        "Effect sizes: the matched-pairs rank-biserial correlation of the nonzero paired "
        "differences (+1: the treatment better on every pair); estimates: the Hodges-Lehmann "
        "median of the Walsh averages of treatment − control, with its exact 95% interval "
        "from the signed-rank distribution (unbounded below 6 pairs).",
        *_treatment_notes(treatments),
        f"Marginal: supported, but the median relative improvement of the functional metrics "
        f"over SIDDO is below {fmt.pct(options.marginal_threshold)}.",
        "Asymmetry matrix: for every control present and two scales, raw Δ = agreement(KD) − "
        "agreement(control) and headroom Δ / (1 − agreement(control)) (the share of the "
        "control's remaining disagreement KD closed; undefined where the control agrees on "
        "every example), on teacher-correct and teacher-incorrect test examples, per paired "
        "seed: mean with its 95% t interval, and one-sided Wilcoxon tests of Δincorrect − "
        f"Δcorrect each way at {options.alpha_level:g}. A cell is negative or positive when "
        "its test is significant, symmetric when neither is and the 95% interval of the "
        f"difference lies within ±{options.asymmetry_tolerance:g}, else undetermined.",
        f"Robust label: the common label of the cells of {robust} on both scales; "
        "baseline-dependent when they differ. 'Copied the teacher's mistakes' is said only "
        "when transfer is supported or marginal and the robust label is negative.",
        f"The paper's label: Δ = agreement(KD) − agreement(B) on teacher-correct and "
        f"teacher-incorrect test examples, B = {baseline} (excluded: {excluded}); symmetric "
        f"within ±{options.asymmetry_tolerance:g} of the point estimates; tested with a "
        f"one-sided Wilcoxon test of the per-seed Δincorrect − Δcorrect (greater) at "
        f"{options.alpha_level:g}.",
        "Pooled rows: every (teacher seed, student seed) pair of a setting in one paired test; "
        "pairs that share a teacher are not independent, so read pooled p-values as "
        "descriptive and the per-teacher verdict counts beside them.",
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
    width += "".join(f", {p}" for p in fmt.noise_parts(row.get("teacher_label_noise", 0.0)))
    return (f"{fmt.metric_label(row['metric'], arrow=False)}, α={row['alpha']:g}, teacher seed "
            f"{row['teacher_seed']}{width}, n={int(row['n'])} pairs")  # fmt: skip
