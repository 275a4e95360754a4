"""One paired comparison: the one-sided Wilcoxon signed-rank test (PROTOCOL section 5), its
effect size and estimate (section 10), the FDR adjustment of a family, and what n can show.

- effect size: the matched-pairs rank-biserial correlation of the nonzero differences (the
  pairs the test ranks), (R+ - R-) / (R+ + R-), signed so that positive = treatment better;
- estimate: the Hodges-Lehmann estimate of treatment - control, the median of the Walsh
  averages (d_i + d_j) / 2, i <= j, with its exact confidence interval from the signed-rank
  distribution (the interval is unbounded when n is too small for any to reach the level);
- the smallest p a one-sided exact test of n nonzero pairs can give is 2^-n, so below
  `min_pairs(level)` pairs no outcome is significant (`insufficient n`);
- `seeds_needed`: a planning figure from the observed differences (normal approximation
  with the Wilcoxon test's asymptotic efficiency 3/pi), not a guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import stats as sps

DIRECTIONS = ("lower", "higher")
FDR_METHODS = ("bh", "by")  # Benjamini-Hochberg (the paper), Benjamini-Yekutieli
CONFIDENCE = 0.95
EXACT_NULL_MAX_N = 400  # above: the normal approximation of the signed-rank distribution


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
    effect_size: float = math.nan  # rank-biserial, + = treatment better; NaN when all_zero
    estimate: float = math.nan  # Hodges-Lehmann estimate of treatment - control
    ci_low: float = math.nan  # its exact 95% interval (-inf/inf: n too small to bound it)
    ci_high: float = math.nan
    seeds_needed: float = math.nan  # pairs to detect the observed effect (inf: wrong way)
    p_adjusted: float = math.nan  # FDR-adjusted; NaN for tests outside an FDR family
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
    estimate, low, high = hodges_lehmann(d)
    common = dict(
        metric=metric,
        better=better,
        n=int(d.size),
        n_nonzero=int(np.count_nonzero(d)),
        mean_treatment=float(t.mean()),
        mean_control=float(c.mean()),
        estimate=estimate,
        ci_low=low,
        ci_high=high,
        seeds_needed=seeds_needed(d, better, level),
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
    sign = 1.0 if better == "higher" else -1.0
    return PairedTest(
        **common,
        statistic=float(res.statistic),
        pvalue=p,
        all_zero=False,
        significant=p <= level,
        effect_size=sign * rank_biserial(d),
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


# ----------------------------------------------------------------------------- effect sizes


def rank_biserial(d: Sequence[float] | np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of the differences d: (R+ - R-) / (R+ + R-)
    over the nonzero differences ranked by |d| (ties: average ranks); NaN when all are zero."""
    d = np.asarray(d, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return math.nan
    ranks = sps.rankdata(np.abs(d))
    plus, minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((plus - minus) / (plus + minus))


def walsh_averages(d: np.ndarray) -> np.ndarray:
    """(d_i + d_j) / 2 for every i <= j, sorted."""
    i, j = np.triu_indices(d.size)
    return np.sort((d[i] + d[j]) / 2.0)


def hodges_lehmann(
    d: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """(estimate, low, high): the median of the Walsh averages of d, and the interval
    [W_(k), W_(M+1-k)] of the sorted Walsh averages (M = n(n+1)/2) with k the largest rank
    whose coverage 1 - 2 P(T+ <= k-1) is at least `confidence` under the signed-rank null
    (exact up to n = 400, normal approximation above). (-inf, inf) when no k reaches it."""
    d = np.asarray(d, dtype=np.float64).ravel()
    if d.size == 0:
        return math.nan, math.nan, math.nan
    walsh = walsh_averages(d)
    k = _interval_rank(d.size, 1.0 - confidence)
    if k < 1:
        return float(np.median(walsh)), -math.inf, math.inf
    return float(np.median(walsh)), float(walsh[k - 1]), float(walsh[walsh.size - k])


def _interval_rank(n: int, alpha: float) -> int:
    """The largest k >= 0 with P(T+ <= k - 1) <= alpha / 2 (k = 0: none)."""
    if n > EXACT_NULL_MAX_N:
        m = n * (n + 1) / 4.0
        s = math.sqrt(n * (n + 1) * (2 * n + 1) / 24.0)
        return max(0, int(math.floor(m - sps.norm.ppf(1 - alpha / 2) * s)))
    cdf = signed_rank_cdf(n)
    # cdf[s] = P(T+ <= s); k - 1 = the largest s with cdf[s] <= alpha / 2
    below = np.flatnonzero(cdf <= alpha / 2 + 1e-12)
    return int(below[-1]) + 1 if below.size else 0


@lru_cache(maxsize=64)
def signed_rank_cdf(n: int) -> np.ndarray:
    """P(T+ <= s), s = 0..n(n+1)/2, of the Wilcoxon signed-rank statistic of n untied nonzero
    pairs under the null (every sign equally likely): counts of subsets of {1..n} by sum."""
    total = n * (n + 1) // 2
    counts = np.zeros(total + 1)
    counts[0] = 1.0
    for rank in range(1, n + 1):
        counts[rank:] = counts[rank:] + counts[:-rank]  # the right side is read first
    cdf = np.cumsum(counts) / counts.sum()
    cdf.flags.writeable = False
    return cdf


# ----------------------------------------------------------------------------- what n can show


def min_pvalue(n: int) -> float:
    """The smallest p-value a one-sided exact Wilcoxon test of n nonzero pairs can give."""
    return 2.0**-n if n > 0 else 1.0


def min_pairs(level: float) -> int:
    """The fewest pairs whose one-sided exact Wilcoxon test can reach `level`."""
    return max(1, math.ceil(math.log2(1.0 / level) - 1e-12))


def fdr_penalty(family: int, method: str) -> float:
    """How much larger than the smallest raw p-value the best adjusted p-value of a family of
    `family` tests can be when every test reaches it: 1 under BH, sum(1/i) under BY."""
    return 1.0 if method == "bh" else float(sum(1.0 / i for i in range(1, family + 1)))


def reachable(n: int, level: float, family: int = 1, method: str = "bh") -> bool:
    """Whether any outcome of n pairs can be significant at `level` (after the FDR
    adjustment of a family of `family` tests)."""
    return min_pvalue(n) * fdr_penalty(family, method) <= level


def seeds_needed(d: np.ndarray, better: str, level: float, power: float = 0.8) -> float:
    """Pairs needed to detect the observed mean difference with the given power at the
    one-sided level: ((z_level + z_power) * sd / mean)^2 / (3/pi), at least min_pairs(level).
    inf when the observed effect is zero or points the other way; NaN below two pairs."""
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2:
        return math.nan
    effect = float(d.mean()) * (1.0 if better == "higher" else -1.0)
    if effect <= 0:
        return math.inf
    sd = float(d.std(ddof=1))
    z = sps.norm.ppf(1 - level) + sps.norm.ppf(power)
    n = (z * sd / effect) ** 2 / (3.0 / math.pi)
    return float(max(min_pairs(level), math.ceil(n)))


# ----------------------------------------------------------------------------- FDR


def fdr_adjust(pvalues: Sequence[float] | np.ndarray, method: str = "bh") -> np.ndarray:
    """FDR-adjusted p-values (scipy's false_discovery_control); NaN entries stay NaN and are
    not counted in the family."""
    if method not in FDR_METHODS:
        raise ValueError(f"FDR method must be one of {FDR_METHODS}, got {method!r}")
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = sps.false_discovery_control(p[ok], method=method)
    return out


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """BH-adjusted p-values; NaN entries stay NaN and are not counted in the family."""
    return fdr_adjust(pvalues, "bh")


def apply_fdr(tests: Sequence[PairedTest], q: float, method: str = "bh") -> tuple[PairedTest, ...]:
    """Adjust a family of tests jointly; significant iff the adjusted p-value <= q."""
    adjusted = fdr_adjust([t.pvalue for t in tests], method)
    return tuple(
        replace(t, p_adjusted=float(p), significant=bool(p <= q))
        for t, p in zip(tests, adjusted, strict=True)
    )


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE):
    """(mean, low, high): the t interval of the mean (NaN bounds below two values)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    scale = float(sps.sem(v, ddof=1))
    if scale == 0:
        return mean, mean, mean
    low, high = sps.t.interval(confidence, v.size - 1, loc=mean, scale=scale)
    return mean, float(low), float(high)


def sem(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean (ddof=1) of the non-NaN values; NaN below two values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(sps.sem(v, ddof=1)) if v.size >= 2 else math.nan
