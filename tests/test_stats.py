"""kdaudit.stats against scipy, hand-computed values and constructed run tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from kdaudit.metrics import BETTER, FUNCTIONAL_METRICS
from kdaudit.stats import (
    VERDICT_COLUMNS,
    Analysis,
    AnalysisOptions,
    PairedTest,
    analyse,
    apply_fdr,
    benjamini_hochberg,
    paired_wilcoxon,
    summarise,
)

SEEDS = list(range(10, 20))
STEP = 1e-4 * np.arange(1, 11)  # distinct per-seed offsets: differences never tie
NOISE = 1e-4 * np.array([1, -2, 3, -4, 5, -6, 7, -8, 9, -10])  # no effect either way
BASE = dict(
    activation_distance=0.2,
    js_divergence=0.05,
    rank_disagreement=0.3,
    prediction_disagreement=0.25,
    accuracy=0.9,
    loss=0.4,
    correct_agreement=0.85,
    incorrect_agreement=0.3,
)


def values(gains: dict[str, float] | None = None, shift: dict[str, float] | None = None):
    """Per-seed metric values: better than BASE by a relative `gain` (plus STEP), else NOISE.

    `shift` adds a constant to a metric regardless of direction.
    """
    gains, shift = gains or {}, shift or {}
    out = {}
    for metric, base in BASE.items():
        sign = -1.0 if BETTER[metric] == "lower" else 1.0
        g = gains.get(metric, 0.0)
        v = base * (1 + sign * g) + sign * STEP if g else base + NOISE
        out[metric] = v + shift.get(metric, 0.0)
    return out


def rows(condition, alpha, temperature, metric_values, teacher_seed=0, seeds=SEEDS):
    out = []
    for i, seed in enumerate(seeds):
        run_id = f"{condition}-a{alpha}-T{temperature}-t{teacher_seed}-s{seed}"
        for metric, v in metric_values.items():
            value = v[i] if np.ndim(v) else v
            out.append(
                dict(
                    run_id=run_id,
                    teacher_seed=teacher_seed,
                    student_seed=seed,
                    condition=condition,
                    alpha=alpha,
                    temperature=temperature,
                    metric=metric,
                    value=float(value),
                )
            )
    return out


def controls(alpha=0.5, temperature=1.0, ls=False, siddo=None, rcd=None, ls_values=None):
    """SIDDO and RCD (and LS) runs at BASE (flat across seeds) unless given."""
    flat = dict(BASE)
    out = rows("siddo", math.nan, math.nan, siddo or flat)
    out += rows("rcd", alpha, temperature, rcd or flat)
    if ls:
        out += rows("ls", alpha, math.nan, ls_values or flat)
    return out


ALL_FUNCTIONAL = dict.fromkeys(FUNCTIONAL_METRICS, 0.3)


def frame(*row_lists) -> pd.DataFrame:
    return pd.DataFrame([r for rl in row_lists for r in rl])


# ----------------------------------------------------------------------------- Wilcoxon


def test_exact_case_all_positive_differences():
    control = np.zeros(10)
    treatment = np.arange(1, 11) * 0.1  # distinct positive differences
    higher = paired_wilcoxon(treatment, control, "higher")
    assert higher.pvalue == pytest.approx(1 / 1024, rel=1e-12)
    assert higher.statistic == 55.0  # every rank is positive: 1 + ... + 10
    assert higher.significant and higher.n == 10 and higher.n_nonzero == 10
    lower = paired_wilcoxon(treatment, control, "lower")
    assert lower.pvalue == pytest.approx(1.0) and not lower.significant


@pytest.mark.parametrize("better", ["lower", "higher"])
def test_matches_scipy(better):
    rng = np.random.default_rng(0)
    t, c = rng.normal(0.1, 1, 10), rng.normal(0, 1, 10)
    res = paired_wilcoxon(t, c, better, metric="m")
    alternative = "less" if better == "lower" else "greater"
    ref = sps.wilcoxon(t - c, alternative=alternative, method="auto")
    assert res.statistic == ref.statistic and res.pvalue == ref.pvalue
    assert res.mean_treatment == pytest.approx(t.mean()) and res.metric == "m"
    assert math.isnan(res.p_adjusted)


def test_some_zero_differences_are_dropped_but_counted():
    d = np.array([0.0, 0.0, 1, 2, 3, 4, 5, 6, 7, 8])
    res = paired_wilcoxon(d, np.zeros(10), "higher")
    assert res.n == 10 and res.n_nonzero == 8
    assert res.pvalue == pytest.approx(1 / 256)  # exact null on the 8 nonzero pairs
    assert res.pvalue == sps.wilcoxon(d, alternative="greater").pvalue


def test_all_zero_is_reported_not_p_one():
    x = np.full(10, 0.3)
    res = paired_wilcoxon(x, x.copy(), "lower")
    assert res.all_zero and res.n == 10 and res.n_nonzero == 0
    assert math.isnan(res.pvalue) and math.isnan(res.statistic) and not res.significant


def test_invalid_inputs():
    with pytest.raises(ValueError, match="at least one pair"):
        paired_wilcoxon([], [], "lower")
    with pytest.raises(ValueError, match="length"):
        paired_wilcoxon([1.0, 2.0], [1.0], "lower")
    with pytest.raises(ValueError, match="better"):
        paired_wilcoxon([1.0], [0.0], "up")
    with pytest.raises(ValueError, match="finite"):
        paired_wilcoxon([1.0, math.nan], [0.0, 0.0], "lower")


def test_paired_test_to_frame():
    f = paired_wilcoxon([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], "higher").to_frame()
    assert list(f.columns) == list(PairedTest.__dataclass_fields__) and len(f) == 1


# ----------------------------------------------------------------------------- BH


def test_benjamini_hochberg_hand_computed():
    p = [0.01, 0.04, 0.03, 0.20]
    # sorted 0.01, 0.03, 0.04, 0.20 -> p*m/rank = 0.04, 0.06, 0.0533, 0.20; cumulative min
    # from the top gives 0.04, 0.0533, 0.0533, 0.20
    expected = [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.20]
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12)
    np.testing.assert_allclose(benjamini_hochberg(p), sps.false_discovery_control(p))


def test_benjamini_hochberg_nan_excluded_from_family():
    adjusted = benjamini_hochberg([0.01, math.nan, 0.04, 0.03])
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2, 3]], sps.false_discovery_control([0.01, 0.04, 0.03]))
    assert np.isnan(benjamini_hochberg([math.nan, math.nan])).all()
    assert benjamini_hochberg([]).shape == (0,)


def test_apply_fdr_sets_significance_on_adjusted_p():
    tests = [
        PairedTest("a", "lower", 10, 10, 0.0, p, False, 0.0, 0.0, significant=True)
        for p in (0.01, 0.04, 0.03, 0.20)
    ]
    adjusted = apply_fdr(tests, q=0.05)
    assert [t.significant for t in adjusted] == [True, False, False, False]
    assert adjusted[1].p_adjusted == pytest.approx(0.04 * 4 / 3)


# ----------------------------------------------------------------------------- verdicts


def only(analysis: Analysis, alpha=0.5):
    (setting,) = [s for s in analysis.settings if s.alpha == alpha]
    return setting


def test_supported():
    runs = frame(controls(), rows("kd", 0.5, 1.0, values(ALL_FUNCTIONAL)))
    s = only(analyse(runs))
    assert s.verdict == "supported" and s.n_significant == 4 and s.n == 10
    assert s.relative_improvement > 0.3
    siddo = s.comparison("siddo")
    for m in FUNCTIONAL_METRICS:
        t = siddo.test(m)
        assert t.pvalue == pytest.approx(1 / 1024)
        assert t.p_adjusted == pytest.approx(1 / 1024)  # all four equal: BH leaves them
    assert math.isnan(siddo.test("accuracy").p_adjusted)  # uncorrected, outside the family
    assert s.note == ""


def test_relative_improvement_is_median_over_functional_metrics():
    gains = dict(zip(FUNCTIONAL_METRICS, (0.1, 0.2, 0.3, 0.4), strict=True))
    runs = frame(controls(), rows("kd", 0.5, 1.0, values(gains)))
    s = only(analyse(runs))
    kd = values(gains)
    rel = [(BASE[m] - kd[m].mean()) / BASE[m] for m in FUNCTIONAL_METRICS]
    assert s.relative_improvement == pytest.approx(np.median(rel), rel=1e-12)


def test_marginal_when_improvement_below_threshold():
    runs = frame(controls(), rows("kd", 0.5, 1.0, values(dict.fromkeys(FUNCTIONAL_METRICS, 0.02))))
    s = only(analyse(runs))
    assert s.n_significant == 4 and s.verdict == "marginal"
    assert 0 < s.relative_improvement < 0.10
    lenient = only(analyse(runs, AnalysisOptions(marginal_threshold=0.01)))
    assert lenient.verdict == "supported"


def test_two_of_four_is_not_a_majority():
    gains = {m: 0.3 for m in FUNCTIONAL_METRICS[:2]}
    runs = frame(controls(), rows("kd", 0.5, 1.0, values(gains)))
    s = only(analyse(runs))
    assert s.n_significant == 2 and s.verdict == "not_supported"


def test_three_of_four_is_a_majority():
    gains = {m: 0.3 for m in FUNCTIONAL_METRICS[:3]}
    s = only(analyse(frame(controls(), rows("kd", 0.5, 1.0, values(gains)))))
    assert s.n_significant == 3 and s.verdict == "supported"


def test_significance_needs_both_siddo_and_rcd():
    # RCD as good as KD on two functional metrics: those do not count.
    kd = values(ALL_FUNCTIONAL)
    rcd = dict(BASE)
    for m in FUNCTIONAL_METRICS[:2]:
        rcd[m] = kd[m] + NOISE
    s = only(analyse(frame(controls(rcd=rcd), rows("kd", 0.5, 1.0, kd))))
    assert s.comparison("siddo").test(FUNCTIONAL_METRICS[0]).significant
    assert not s.comparison("rcd").test(FUNCTIONAL_METRICS[0]).significant
    assert s.n_significant == 2 and s.verdict == "not_supported"


def test_missing_rcd_is_not_supported_with_note():
    runs = frame(
        rows("siddo", math.nan, math.nan, BASE),
        rows("rcd", 0.1, 1.0, BASE),  # another alpha: does not match
        rows("kd", 0.5, 1.0, values(ALL_FUNCTIONAL)),
    )
    s = only(analyse(runs))
    assert s.verdict == "not_supported" and "RCD" in s.note
    assert [c.control for c in s.comparisons] == ["siddo"]
    assert s.relative_improvement > 0  # still reported against SIDDO


def test_rcd_must_match_temperature():
    runs = frame(controls(temperature=2.0), rows("kd", 0.5, 1.0, values(ALL_FUNCTIONAL)))
    s = only(analyse(runs))
    assert s.comparison("rcd") is None and s.verdict == "not_supported"


def test_ls_is_tested_but_not_in_verdict():
    kd = values(ALL_FUNCTIONAL)
    ls_values = {m: kd[m] + NOISE for m in BASE}  # LS as good as KD
    runs = frame(controls(ls=True, ls_values=ls_values), rows("kd", 0.5, 1.0, kd))
    s = only(analyse(runs))
    assert s.comparison("ls") is not None
    assert not s.comparison("ls").test(FUNCTIONAL_METRICS[0]).significant
    assert s.verdict == "supported"


def test_direction_of_accuracy_and_loss():
    kd = values(ALL_FUNCTIONAL, shift=dict(accuracy=0.01, loss=0.05))  # better acc, worse loss
    s = only(analyse(frame(controls(), rows("kd", 0.5, 1.0, kd))))
    siddo = s.comparison("siddo")
    acc, loss = siddo.test("accuracy"), siddo.test("loss")
    assert acc.better == "higher" and acc.significant and acc.pvalue < 0.05
    assert loss.better == "lower" and not loss.significant and loss.pvalue > 0.5


def test_all_zero_metric_leaves_the_family():
    kd = values(ALL_FUNCTIONAL)
    rcd = dict(BASE)
    rcd["js_divergence"] = kd["js_divergence"]  # identical to KD
    s = only(analyse(frame(controls(rcd=rcd), rows("kd", 0.5, 1.0, kd))))
    t = s.comparison("rcd").test("js_divergence")
    assert t.all_zero and math.isnan(t.pvalue) and math.isnan(t.p_adjusted)
    assert not t.significant and s.n_significant == 3


# ----------------------------------------------------------------------------- pairing


def test_pairing_by_student_seed_shuffled_and_missing_seed():
    kd = values(ALL_FUNCTIONAL)
    siddo = [r for r in rows("siddo", math.nan, math.nan, BASE) if r["student_seed"] != 13]
    runs = frame(siddo, rows("rcd", 0.5, 1.0, BASE), rows("kd", 0.5, 1.0, kd))
    runs = runs.sample(frac=1.0, random_state=0).reset_index(drop=True)
    s = only(analyse(runs))
    assert s.n == 10
    assert s.comparison("siddo").n == 9 and s.comparison("siddo").test("accuracy").n == 9
    assert s.comparison("rcd").n == 10
    assert "SIDDO" in s.note
    # the statistic matches scipy on the seed-aligned differences
    keep = [i for i, seed in enumerate(SEEDS) if seed != 13]
    d = kd["activation_distance"][keep] - BASE["activation_distance"]
    ref = sps.wilcoxon(d, alternative="less")
    assert s.comparison("siddo").test("activation_distance").pvalue == ref.pvalue


def test_pairing_uses_seed_not_row_order():
    # Seeds differ a lot, so only a seed-wise pairing sees KD's constant gain.
    siddo_values = {m: BASE[m] + 0.1 * np.arange(10) for m in BASE}
    kd_values = {m: siddo_values[m] - 0.05 * (1 if BETTER[m] == "lower" else -1) for m in BASE}
    siddo = rows("siddo", math.nan, math.nan, siddo_values)[::-1]
    runs = frame(siddo, rows("rcd", 0.5, 1.0, BASE), rows("kd", 0.5, 1.0, kd_values))
    t = only(analyse(runs)).comparison("siddo").test("activation_distance")
    assert t.n_nonzero == 10 and t.mean_treatment - t.mean_control == pytest.approx(-0.05)
    assert t.pvalue == pytest.approx(1 / 1024)  # every seed-wise difference is negative


def test_duplicate_runs_raise():
    runs = frame(controls(), rows("kd", 0.5, 1.0, BASE), rows("kd", 0.5, 1.0, BASE))
    with pytest.raises(ValueError, match="more than one run"):
        analyse(runs)


def test_missing_columns_named():
    runs = frame(controls()).drop(columns=["student_seed", "value"])
    with pytest.raises(ValueError, match="student_seed.*value"):
        analyse(runs)


def test_bad_options():
    runs = frame(controls(), rows("kd", 0.5, 1.0, BASE))
    with pytest.raises(ValueError, match="baseline"):
        analyse(runs, AnalysisOptions(baseline="best"))
    with pytest.raises(ValueError, match="exclude_controls"):
        analyse(runs, AnalysisOptions(exclude_controls=("teacher",)))
    with pytest.raises(ValueError, match="unknown metrics"):
        analyse(runs, AnalysisOptions(metrics=("nope",)))


def test_several_settings_and_teachers():
    runs = frame(
        controls(alpha=0.1),
        rows("rcd", 0.9, 1.0, BASE),
        rows("kd", 0.1, 1.0, values()),
        rows("kd", 0.9, 1.0, values(ALL_FUNCTIONAL)),
        rows("siddo", math.nan, math.nan, BASE, teacher_seed=1),
        rows("rcd", 0.9, 1.0, BASE, teacher_seed=1),
        rows("kd", 0.9, 1.0, values(ALL_FUNCTIONAL), teacher_seed=1),
    )
    a = analyse(runs)
    keys = [(s.teacher_seed, s.alpha) for s in a.settings]
    assert keys == [(0, 0.1), (0, 0.9), (1, 0.9)]
    assert [s.verdict for s in a.settings] == ["not_supported", "supported", "supported"]


# ----------------------------------------------------------------------------- asymmetry


def asym_runs(kd_shift, ls=False, **control_kw):
    kd = values(ALL_FUNCTIONAL, shift=kd_shift)
    return frame(controls(ls=ls, **control_kw), rows("kd", 0.5, 1.0, kd))


def test_best_control_by_accuracy_and_exclusion():
    runs = asym_runs(
        {},
        ls=True,
        siddo=dict(BASE, accuracy=0.90),
        rcd=dict(BASE, accuracy=0.92),
        ls_values=dict(BASE, accuracy=0.91),
    )
    assert only(analyse(runs)).paper_asymmetry.best_control == "rcd"
    excluded = only(analyse(runs, AnalysisOptions(exclude_controls=("rcd",))))
    assert excluded.paper_asymmetry.best_control == "ls"
    assert excluded.comparison("rcd") is not None  # still tested, just not the baseline
    none_left = AnalysisOptions(exclude_controls=("rcd", "ls", "siddo"))
    a = only(analyse(runs, none_left)).paper_asymmetry
    assert a.label == "undetermined" and a.test is None and a.n == 0


def test_best_control_by_agreement_per_bucket():
    runs = asym_runs(
        {},
        ls=True,
        siddo=dict(BASE, correct_agreement=0.88, incorrect_agreement=0.30),
        rcd=dict(BASE, correct_agreement=0.86, incorrect_agreement=0.31, accuracy=0.95),
        ls_values=dict(BASE, correct_agreement=0.87, incorrect_agreement=0.33),
    )
    a = only(analyse(runs, AnalysisOptions(baseline="agreement"))).paper_asymmetry
    assert (a.baseline_correct, a.baseline_incorrect) == ("siddo", "ls")
    assert a.best_control == "correct:siddo/incorrect:ls"
    kd = values(ALL_FUNCTIONAL)
    assert a.delta_correct == pytest.approx(np.mean(kd["correct_agreement"] - 0.88))
    assert a.delta_incorrect == pytest.approx(np.mean(kd["incorrect_agreement"] - 0.33))
    assert only(analyse(runs)).paper_asymmetry.best_control == "rcd"  # accuracy mode


@pytest.mark.parametrize(
    ("shift", "label"),
    [
        (dict(correct_agreement=0.01, incorrect_agreement=0.08), "negative"),
        (dict(correct_agreement=0.05, incorrect_agreement=0.055), "symmetric"),
        (dict(correct_agreement=0.05, incorrect_agreement=0.01), "positive"),
    ],
)
def test_asymmetry_labels(shift, label):
    a = only(analyse(asym_runs(shift))).paper_asymmetry
    assert a.label == label and a.n == 10 and a.best_control == "siddo"


def test_asymmetry_test_and_deltas():
    runs = asym_runs(dict(correct_agreement=0.01, incorrect_agreement=0.08))
    a = only(analyse(runs)).paper_asymmetry
    kd = values(ALL_FUNCTIONAL, shift=dict(correct_agreement=0.01, incorrect_agreement=0.08))
    d_c = kd["correct_agreement"] - BASE["correct_agreement"]
    d_i = kd["incorrect_agreement"] - BASE["incorrect_agreement"]
    assert a.delta_correct == pytest.approx(d_c.mean())
    assert a.delta_incorrect == pytest.approx(d_i.mean())
    np.testing.assert_allclose(a.d_incorrect, d_i)
    ref = sps.wilcoxon(d_i - d_c, alternative="greater")
    assert a.test.better == "higher" and a.test.pvalue == pytest.approx(ref.pvalue)
    assert a.sem_correct == pytest.approx(sps.sem(d_c))
    assert a.student_seeds == tuple(SEEDS)


def test_asymmetry_identical_deltas_is_all_zero():
    same = dict(BASE, correct_agreement=0.5, incorrect_agreement=0.5)
    kd = values(ALL_FUNCTIONAL)
    kd["correct_agreement"] = kd["incorrect_agreement"] = 0.5 + 0.01 + NOISE
    runs = frame(controls(siddo=same, rcd=same), rows("kd", 0.5, 1.0, kd))
    a = only(analyse(runs)).paper_asymmetry
    assert a.test.all_zero and math.isnan(a.pvalue) and a.label == "symmetric"


# ----------------------------------------------------------------------------- frames


def test_frames_have_the_documented_columns():
    runs = frame(controls(ls=True), rows("kd", 0.5, 1.0, values(ALL_FUNCTIONAL)))
    a = analyse(runs)
    v = a.verdicts_frame()
    assert list(v.columns) == VERDICT_COLUMNS and len(v) == 1
    expected = [
        "teacher_seed",
        "condition",
        "alpha",
        "temperature",
        "width",  # NaN: a table without a width axis
        "teacher_label_noise",  # 0.0: a table without the teacher-error sweep
        "n",
        "verdict",
        "n_significant",
        "relative_improvement",
        "asymmetry",  # the robust label
        "paper_asymmetry",
        "delta_correct",
        "delta_incorrect",
        "best_control",
        "asymmetry_p",
        "seeds_needed",
        "asymmetry_why",
        "note",
    ]
    assert list(v.columns) == expected
    t = a.tests_frame()
    for column in ["control", "metric", "statistic", "pvalue", "p_adjusted", "significant"]:
        assert column in t.columns
    for column in ["all_zero", "n", "n_nonzero", "mean_treatment", "mean_control", "better"]:
        assert column in t.columns
    assert len(t) == 3 * 6  # 3 controls x (4 functional + accuracy + loss)
    assert len(a.asymmetry_frame()) == 10
    assert list(a.to_frame().columns) == expected


def test_empty_analysis_frames():
    a = analyse(frame(controls()))
    assert a.settings == () and a.verdicts_frame().empty and a.tests_frame().empty


def test_summarise_mean_sem_n():
    runs = frame(controls(), rows("kd", 0.5, 1.0, values(ALL_FUNCTIONAL)))
    runs.loc[runs.index[0], "value"] = math.nan  # one missing value is not counted
    s = summarise(runs)
    assert list(s.columns) == [
        "teacher_seed",
        "condition",
        "alpha",
        "temperature",
        "width",
        "teacher_label_noise",
        "metric",
        "mean",
        "sem",
        "n",
    ]
    row = s[(s.condition == "kd") & (s.metric == "loss")].iloc[0]
    kd_loss = values(ALL_FUNCTIONAL)["loss"]
    assert row["mean"] == pytest.approx(kd_loss.mean()) and row["n"] == 10
    assert row["sem"] == pytest.approx(sps.sem(kd_loss, ddof=1))
    siddo = s[s.condition == "siddo"]
    assert math.isnan(siddo["alpha"].iloc[0])  # NaN settings kept as a group
    assert siddo["n"].min() == 9
