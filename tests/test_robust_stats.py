"""The robust view (PROTOCOL section 10): effect sizes, Hodges-Lehmann intervals, what n can
show, the asymmetry matrix on two scales, the robust label, pooled teachers and DISDO; each
against an independent computation (brute-force enumeration, scipy, hand-worked values)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from kdaudit.config import AnalysisOptions
from kdaudit.stats import POOLED, analyse
from kdaudit.stats.paired import (
    fdr_adjust,
    hodges_lehmann,
    mean_interval,
    min_pairs,
    min_pvalue,
    paired_wilcoxon,
    rank_biserial,
    reachable,
    seeds_needed,
    signed_rank_cdf,
)

# ----------------------------------------------------------------------------- paired tests


@pytest.mark.parametrize("n", [1, 2, 5, 9, 11])
def test_signed_rank_null_matches_enumeration(n):
    """Every sign pattern of ranks 1..n equally likely: the distribution of T+ by brute force."""
    sums = [sum(r for r, s in zip(range(1, n + 1), signs, strict=True) if s)
            for signs in itertools.product((0, 1), repeat=n)]  # fmt: skip
    total = n * (n + 1) // 2
    brute = np.array([np.mean(np.array(sums) <= s) for s in range(total + 1)])
    np.testing.assert_allclose(signed_rank_cdf(n), brute, rtol=0, atol=1e-15)


def test_hodges_lehmann_estimate_is_the_median_of_walsh_averages():
    d = np.array([0.31, -0.12, 0.5, 0.83, 0.21, 0.47, 0.94, -0.06, 0.62, 0.35])
    walsh = [(a + b) / 2 for a, b in itertools.combinations_with_replacement(d, 2)]
    assert len(walsh) == 55
    estimate, _, _ = hodges_lehmann(d)
    assert estimate == pytest.approx(np.median(walsh), abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [6, 8, 12])
def test_hodges_lehmann_interval_inverts_the_exact_two_sided_test(seed, n):
    """The exact 95% interval is the set of shifts theta the two-sided exact Wilcoxon test of
    d - theta does not reject at 0.05 (checked away from the Walsh averages, where T+ jumps)."""
    d = np.random.default_rng(seed).normal(0.3, 1.0, n)
    _, low, high = hodges_lehmann(d)
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2)
    gaps = (walsh[1:] + walsh[:-1]) / 2  # midpoints between consecutive Walsh averages
    for theta in [walsh[0] - 1, *gaps, walsh[-1] + 1]:
        p = sps.wilcoxon(d - theta, alternative="two-sided", method="exact").pvalue
        assert (low < theta < high) == (p > 0.05), (theta, low, high, p)


def test_hodges_lehmann_interval_is_unbounded_below_six_pairs():
    # 2 * 2^-5 = 0.0625 > 0.05: no two-sided 95% interval from five pairs
    assert hodges_lehmann(np.arange(1.0, 6.0))[1:] == (-math.inf, math.inf)
    assert all(map(math.isfinite, hodges_lehmann(np.arange(1.0, 7.0))[1:]))


def test_rank_biserial_by_hand_and_from_scipy_statistic():
    # |d| ranks 1, 2, 3, 4; R+ = 1 + 3 + 4 = 8, R- = 2: (8 - 2) / 10
    assert rank_biserial([0.1, -0.2, 0.3, 0.4]) == pytest.approx(0.6)
    assert rank_biserial([0.0, 0.1, -0.2, 0.3, 0.4]) == pytest.approx(0.6)  # zero dropped
    assert math.isnan(rank_biserial([0.0, 0.0]))
    d = np.random.default_rng(3).normal(0.2, 1, 15)
    t_plus = sps.wilcoxon(d, alternative="greater").statistic  # R+
    assert rank_biserial(d) == pytest.approx(4 * t_plus / (15 * 16) - 1)


def test_effect_size_is_positive_when_the_treatment_is_better():
    control = np.linspace(0.30, 0.39, 10)
    lower = paired_wilcoxon(control - 0.05, control, "lower")  # lower is better: better
    assert lower.effect_size == pytest.approx(1.0) and lower.estimate == pytest.approx(-0.05)
    higher = paired_wilcoxon(control - 0.05, control, "higher")  # higher is better: worse
    assert higher.effect_size == pytest.approx(-1.0)
    assert (higher.ci_low, higher.ci_high) == pytest.approx((-0.05, -0.05))  # no spread


def test_smallest_p_and_the_pairs_it_takes():
    for n in range(1, 9):
        p = sps.wilcoxon(np.arange(1.0, n + 1), alternative="greater", method="exact").pvalue
        assert p == pytest.approx(min_pvalue(n))  # every difference positive: 2^-n
    assert min_pairs(0.05) == 5 and min_pairs(0.01) == 7 and min_pairs(0.5) == 1
    assert not reachable(4, 0.05) and reachable(5, 0.05)
    # Benjamini-Yekutieli over four tests multiplies the best adjusted p by 1+1/2+1/3+1/4
    assert not reachable(5, 0.05, family=4, method="by") and reachable(6, 0.05, 4, "by")
    p = [min_pvalue(5)] * 4
    assert fdr_adjust(p, "by") == pytest.approx(np.array(p) * (25 / 12))


def test_fdr_methods_match_scipy():
    p = np.array([0.001, 0.02, np.nan, 0.04, 0.3])
    for method in ("bh", "by"):
        expected = sps.false_discovery_control(p[~np.isnan(p)], method=method)
        got = fdr_adjust(p, method)
        assert np.isnan(got[2])
        np.testing.assert_allclose(got[~np.isnan(p)], expected)
    with pytest.raises(ValueError, match="bh"):
        fdr_adjust(p, "holm")


def test_mean_interval_matches_scipy_t():
    v = np.array([0.12, 0.08, 0.15, 0.11, 0.09, 0.14])
    expected = sps.ttest_1samp(v, 0).confidence_interval(0.95)
    mean, low, high = mean_interval(v)
    assert (mean, low, high) == pytest.approx((v.mean(), expected.low, expected.high))
    assert math.isnan(mean_interval([0.1])[1])


def test_seeds_needed_by_hand():
    d = np.array([0.01, 0.03, 0.02, 0.04, 0.0])  # mean 0.02, sd 0.0158
    z = sps.norm.ppf(0.95) + sps.norm.ppf(0.8)
    n = (z * d.std(ddof=1) / d.mean()) ** 2 / (3 / math.pi)
    assert seeds_needed(d, "higher", 0.05) == max(5, math.ceil(n))
    noisy = np.array([0.05, -0.04, 0.03, -0.02, 0.01])  # mean 0.006, sd 0.035
    assert seeds_needed(noisy, "higher", 0.05) > 100
    assert seeds_needed(d, "lower", 0.05) == math.inf  # the effect points the other way
    assert seeds_needed(np.full(4, 0.5), "higher", 0.05) == 5  # no spread: the exact minimum


# ----------------------------------------------------------------------------- run tables

SEEDS = list(range(10, 20))
FUNCTIONAL = dict(activation_distance=0.2, js_divergence=0.05, rank_disagreement=0.3,
                  prediction_disagreement=0.25)  # fmt: skip
ACCURACY = {"kd": 0.90, "siddo": 0.91, "rcd": 0.92, "ls": 0.89, "disdo": 0.88}


def _rows(condition, alpha, metrics, teacher_seed=0, seeds=SEEDS):
    metrics = {"accuracy": ACCURACY[condition], **metrics}
    out = []
    for i, seed in enumerate(seeds):
        for metric, v in metrics.items():
            out.append(dict(run_id=f"{condition}-{alpha}-{teacher_seed}-{seed}",
                            teacher_seed=teacher_seed, student_seed=seed, condition=condition,
                            alpha=alpha, temperature=math.nan if math.isnan(alpha) else 1.0,
                            metric=metric, value=float(np.asarray(v)[i] if np.ndim(v) else v)))  # fmt: skip
    return out


def _grid(kd, siddo, rcd, teacher_seed=0, seeds=SEEDS, extra=()):
    """KD at alpha 0.5 far more similar to the teacher than either control (transfer), with
    the agreement buckets given per condition (arrays over seeds or scalars)."""
    n = len(seeds)
    step = 1e-3 * np.arange(1, n + 1)
    better = {m: v * 0.5 - step for m, v in FUNCTIONAL.items()}
    flat = {m: v + 1e-4 * np.resize([1, -2, 3, -4, 5, -6, 7, -8, 9, -10], n)
            for m, v in FUNCTIONAL.items()}  # fmt: skip
    out = _rows("kd", 0.5, {**better, **kd}, teacher_seed, seeds)
    out += _rows("siddo", math.nan, {**flat, **siddo}, teacher_seed, seeds)
    out += _rows("rcd", 0.5, {**flat, **rcd}, teacher_seed, seeds)
    for condition, alpha, metrics in extra:
        out += _rows(condition, alpha, {**flat, **metrics}, teacher_seed, seeds)
    return pd.DataFrame(out)


def _buckets(correct, incorrect):
    return dict(correct_agreement=correct, incorrect_agreement=incorrect)


JITTER = 1e-3 * np.array([3, -1, 4, -1.5, 5, -9, 2, -6, 5.5, -3.5])  # distinct, no ties


def test_matrix_cells_by_hand_and_a_headroom_flip():
    """KD gains 0.05 on both buckets over SIDDO: raw symmetric-ish, but SIDDO's correct
    agreement 0.9 leaves little room, so on the headroom scale the correct gain is larger
    (0.05/0.1 = 0.5 against 0.05/0.7): positive. Against RCD (correct 0.9, incorrect 0.1) KD
    gains 0.05 and 0.30: negative on both scales. The robust label: baseline-dependent."""
    kd = _buckets(0.95 + JITTER, 0.60 + JITTER * 2)
    siddo = _buckets(0.90 + JITTER * 0, 0.30 + JITTER * 0)
    rcd = _buckets(0.90, 0.10)
    analysis = analyse(_grid(kd, siddo, rcd))
    (s,) = analysis.settings
    cells = {(c.control, c.scale): c for c in s.matrix}
    assert set(cells) == {(c, sc) for c in ("siddo", "rcd") for sc in ("raw", "headroom")}
    raw = cells["siddo", "raw"]
    d_c, d_i = kd["correct_agreement"] - 0.9, kd["incorrect_agreement"] - 0.3
    assert raw.delta_correct == pytest.approx(d_c.mean())
    assert raw.delta_incorrect == pytest.approx(d_i.mean())
    ci = sps.ttest_1samp(d_i, 0).confidence_interval(0.95)
    assert raw.delta_incorrect_ci == pytest.approx((ci.low, ci.high))
    assert raw.p_negative == pytest.approx(sps.wilcoxon(d_i - d_c, alternative="greater").pvalue)
    assert raw.p_positive == pytest.approx(sps.wilcoxon(d_i - d_c, alternative="less").pvalue)
    head = cells["siddo", "headroom"]
    h_c, h_i = d_c / (1 - 0.9), d_i / (1 - 0.3)
    assert head.delta_correct == pytest.approx(h_c.mean())
    assert head.delta_incorrect == pytest.approx(h_i.mean())
    assert head.label == "positive"
    assert cells["rcd", "raw"].label == "negative" and cells["rcd", "headroom"].label == "negative"
    assert s.paper_asymmetry.label == "negative"  # the paper's B: the most accurate, RCD
    assert s.asymmetry == "baseline-dependent"
    assert "positive vs SIDDO (headroom)" in s.asymmetry_why
    assert "negative vs RCD (raw, headroom)" in s.asymmetry_why
    frame = analysis.matrix_frame()
    assert len(frame) == 4 and set(frame["label"]) <= {"negative", "positive", "symmetric",
                                                        "undetermined"}  # fmt: skip


def test_robust_label_when_every_cell_agrees():
    kd = _buckets(0.91 + JITTER * 0.1, 0.60 + JITTER)
    s = analyse(_grid(kd, _buckets(0.9, 0.3), _buckets(0.9, 0.2))).settings[0]
    assert {c.label for c in s.matrix} == {"negative"}
    assert s.asymmetry == "negative" and s.asymmetry_why == ""


def test_symmetric_needs_the_interval_within_the_tolerance():
    kd = _buckets(0.95 + JITTER, 0.35 + JITTER[::-1])
    siddo = rcd = _buckets(0.9 + JITTER * 0, 0.3)
    s = analyse(_grid(kd, siddo, rcd)).settings[0]
    raw = [c for c in s.matrix if c.scale == "raw"]
    assert all(abs(c.difference) < 0.01 for c in raw)
    assert all(c.label == ("symmetric" if c.difference_ci[1] - c.difference_ci[0] < 0.02
                           and c.difference_ci[0] >= -0.01 else "undetermined")
               for c in raw)  # fmt: skip
    wide = analyse(_grid(kd, siddo, rcd), AnalysisOptions(asymmetry_tolerance=0.5)).settings[0]
    assert {c.label for c in wide.matrix if c.scale == "raw"} == {"symmetric"}
    tight = analyse(_grid(kd, siddo, rcd), AnalysisOptions(asymmetry_tolerance=1e-6)).settings[0]
    assert {c.label for c in tight.matrix if c.scale == "raw"} == {"undetermined"}


def test_headroom_undefined_is_counted_not_dropped():
    siddo = _buckets(np.r_[np.ones(3), np.full(7, 0.9)], 0.3)
    s = analyse(_grid(_buckets(0.95 + JITTER, 0.5), siddo, _buckets(0.9, 0.2))).settings[0]
    head = next(c for c in s.matrix if c.control == "siddo" and c.scale == "headroom")
    raw = next(c for c in s.matrix if c.control == "siddo" and c.scale == "raw")
    assert head.n_undefined == 3 and head.n == 7 and raw.n == 10
    assert "headroom undefined for 3 seed(s)" in head.note
    all_one = analyse(_grid(_buckets(0.95, 0.5), _buckets(1.0, 0.3), _buckets(0.9, 0.2)))
    head = next(c for c in all_one.settings[0].matrix
                if c.control == "siddo" and c.scale == "headroom")  # fmt: skip
    assert head.label == "undetermined" and head.n == 0 and "headroom undefined" in head.note


def test_insufficient_n_is_never_not_supported():
    kd, ctl = _buckets(0.95, 0.6), _buckets(0.9, 0.3)
    four = analyse(_grid(kd, ctl, ctl, seeds=SEEDS[:4])).settings[0]
    assert four.verdict == "insufficient_n"
    assert "no outcome can reach q=0.05 below 5" in four.note
    five = analyse(_grid(kd, ctl, ctl, seeds=SEEDS[:5])).settings[0]
    assert five.verdict == "supported"  # every difference in the better direction: p = 1/32
    by = analyse(_grid(kd, ctl, ctl, seeds=SEEDS[:5]), AnalysisOptions(fdr_method="by"))
    assert by.settings[0].verdict == "insufficient_n"  # 1/32 * 25/12 > 0.05


def test_effect_sizes_reach_the_tests_table():
    analysis = analyse(_grid(_buckets(0.95, 0.6), _buckets(0.9, 0.3), _buckets(0.9, 0.3)))
    tests = analysis.tests_frame()
    functional = tests[tests["metric"].isin(FUNCTIONAL)]
    assert (functional["effect_size"] == 1.0).all()  # every pair better
    assert (functional["ci_high"] < 0).all() and (functional["estimate"] < 0).all()
    assert (functional["ci_low"] <= functional["estimate"]).all()


def test_pooled_over_teacher_seeds():
    kd, ctl = _buckets(0.95 + JITTER, 0.6 + JITTER), _buckets(0.9, 0.3)
    runs = pd.concat([_grid(kd, ctl, ctl, teacher_seed=t) for t in (0, 1, 2)])
    analysis = analyse(runs)
    assert len(analysis.settings) == 3
    (pooled,) = analysis.pooled
    assert pooled.teacher_seed == POOLED and pooled.n_teachers == 3 and pooled.n == 30
    assert pooled.teacher_verdicts == {"supported": 3}
    assert all(c.n == 30 for c in pooled.comparisons)
    raw = next(c for c in pooled.matrix if c.control == "siddo" and c.scale == "raw")
    assert raw.n == 30 and raw.delta_incorrect == pytest.approx((0.6 + JITTER).mean() - 0.3)
    # one teacher: nothing to pool
    assert analyse(_grid(kd, ctl, ctl)).pooled == ()


def test_asymmetry_controls_option_and_extra_controls_join_the_matrix():
    kd = _buckets(0.95 + JITTER, 0.60 + JITTER * 2)
    extra = [("ls", 0.5, _buckets(0.9, 0.1)), ("disdo", math.nan, _buckets(0.9, 0.55))]
    runs = _grid(kd, _buckets(0.9, 0.3), _buckets(0.9, 0.1), extra=extra)
    s = analyse(runs).settings[0]
    assert {c.control for c in s.matrix} == {"siddo", "rcd", "ls", "disdo"}
    only_rcd = analyse(runs, AnalysisOptions(asymmetry_controls=("rcd", "ls"))).settings[0]
    assert only_rcd.asymmetry == "negative"
    with pytest.raises(ValueError, match="asymmetry_controls"):
        analyse(runs, AnalysisOptions(asymmetry_controls=("nope",)))
