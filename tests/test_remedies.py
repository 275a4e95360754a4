"""Remedy treatments (PROTOCOL section 10): each objective against a hand computation in
float64 numpy, and the remedies table against scipy on constructed run tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from scipy.special import log_softmax, softmax

from kdaudit.conditions import CONDITIONS, designs
from kdaudit.conditions.objectives import Batch, build_objective, corrected_target
from kdaudit.stats import analyse
from kdaudit.stats.remedies import remedies_frame

ALPHA, T = 0.7, 2.0
Z_S = np.array([[1.0, -0.5, 0.3, 0.0], [0.2, 0.1, -1.0, 2.0], [-0.3, 0.8, 0.5, 0.1]])
Z_T = np.array([[2.0, 0.5, -1.0, 0.0], [0.0, 3.0, 1.0, -1.0], [0.1, 0.2, 2.5, 0.3]])
Y = np.array([0, 3, 2])  # the teacher is right on rows 0 and 2, wrong on row 1 (says 1)


def _loss(name: str, z_t=Z_T) -> float:
    teacher = lambda batch: torch.tensor(z_t)  # noqa: E731
    objective = build_objective(name, ALPHA, T, 4, teacher)
    batch = Batch(torch.arange(3), torch.zeros(3, 1), torch.tensor(Y))
    return float(objective(torch.tensor(Z_S, dtype=torch.float64), batch))


def _ce_each() -> np.ndarray:
    return -log_softmax(Z_S, axis=1)[np.arange(3), Y]


def _kl_each(target: np.ndarray) -> np.ndarray:
    """KL(target || softmax(z_s / T)) per row, 0 log 0 = 0."""
    log_q = log_softmax(Z_S / T, axis=1)
    terms = np.where(target > 0, target * (np.log(np.where(target > 0, target, 1)) - log_q), 0)
    return terms.sum(axis=1)


def test_kd_masked_by_hand():
    right = Z_T.argmax(1) == Y
    assert right.tolist() == [True, False, True]
    kl = _kl_each(softmax(Z_T / T, axis=1))
    per_example = np.where(right, (1 - ALPHA) * _ce_each() + ALPHA * T**2 * kl, _ce_each())
    assert _loss("kd_masked") == pytest.approx(per_example.mean(), rel=1e-12)


def test_kd_confidence_by_hand():
    weight = softmax(Z_T, axis=1)[np.arange(3), Y]  # the teacher's probability of the label
    kl = _kl_each(softmax(Z_T / T, axis=1))
    expected = (1 - ALPHA) * _ce_each().mean() + ALPHA * T**2 * (weight * kl).mean()
    assert _loss("kd_confidence") == pytest.approx(expected, rel=1e-12)


def test_kd_corrected_by_hand():
    p = softmax(Z_T / T, axis=1)
    fixed = p.copy()
    fixed[1, 3] += fixed[1, 1]  # row 1: the teacher says 1, the label is 3
    fixed[1, 1] = 0.0
    np.testing.assert_allclose(corrected_target(torch.tensor(Z_T), torch.tensor(Y), T), fixed)
    expected = (1 - ALPHA) * _ce_each().mean() + ALPHA * T**2 * _kl_each(fixed).mean()
    assert _loss("kd_corrected") == pytest.approx(expected, rel=1e-12)


def test_a_teacher_right_everywhere_makes_every_remedy_kd_up_to_confidence():
    z_t = Z_T.copy()
    z_t[1, 3] = 5.0  # now right on every row
    assert _loss("kd_masked", z_t) == pytest.approx(_loss("kd", z_t), rel=1e-12)
    assert _loss("kd_corrected", z_t) == pytest.approx(_loss("kd", z_t), rel=1e-12)


def test_remedies_are_treatments_tested_against_kd_too():
    for name in ("kd_masked", "kd_confidence", "kd_corrected"):
        entry = CONDITIONS.get(name)
        assert entry.is_treatment and entry.remedy_of == "kd"
        assert tuple(designs()[name].verdict) == ("siddo", "rcd")
        assert designs()[name].also["kd"] == ("alpha", "temperature")


# ----------------------------------------------------------------------------- the table

SEEDS = list(range(10, 20))
JITTER = 1e-3 * np.array([3, -1, 4, -1.5, 5, -9, 2, -6, 5.5, -3.5])


def _rows(condition, alpha, metrics):
    out = []
    for i, seed in enumerate(SEEDS):
        for metric, v in metrics.items():
            out.append(dict(run_id=f"{condition}-{seed}", teacher_seed=0, student_seed=seed,
                            condition=condition, alpha=alpha,
                            temperature=math.nan if math.isnan(alpha) else 1.0, metric=metric,
                            value=float(np.asarray(v)[i] if np.ndim(v) else v)))  # fmt: skip
    return out


def _metrics(scale, accuracy, correct, incorrect):
    base = dict(activation_distance=0.2, js_divergence=0.05, rank_disagreement=0.3,
                prediction_disagreement=0.25)  # fmt: skip
    m = {k: v * scale + (1e-3 * np.arange(1, 11) if scale < 1 else JITTER * 0.1)
         for k, v in base.items()}  # fmt: skip
    return dict(m, accuracy=accuracy, correct_agreement=correct, incorrect_agreement=incorrect)


def test_remedies_table_against_scipy():
    kd_acc = 0.80 + JITTER
    masked_acc = 0.79 + JITTER[::-1]
    runs = pd.DataFrame(
        _rows("kd", 0.9, _metrics(0.5, kd_acc, 0.95 + JITTER, 0.70 + JITTER))
        + _rows("kd_masked", 0.9, _metrics(0.6, masked_acc, 0.95 + JITTER, 0.31 + JITTER))
        + _rows("siddo", math.nan, _metrics(1.0, 0.78, 0.90, 0.30))
        + _rows("rcd", 0.9, _metrics(1.0, 0.82, 0.90, 0.30))
    )
    analysis = analyse(runs)
    kd = next(s for s in analysis.settings if s.condition == "kd")
    masked = next(s for s in analysis.settings if s.condition == "kd_masked")
    assert kd.asymmetry == "negative"
    assert masked.comparison("kd") is not None  # tested against KD too
    (row,) = remedies_frame(runs, analysis).to_dict(orient="records")
    assert row["remedy_of"] == "kd" and row["of_asymmetry"] == "negative"
    assert row["of_negative_cells"] == 4
    assert row["negative_cells"] == sum(c.label == "negative" for c in masked.cells())
    d = masked_acc - kd_acc
    assert row["accuracy"] == pytest.approx(masked_acc.mean())
    assert row["p_less_accurate"] == pytest.approx(sps.wilcoxon(d, alternative="less").pvalue)
    assert row["p_more_accurate"] == pytest.approx(sps.wilcoxon(d, alternative="greater").pvalue)
    assert row["loses_accuracy"] == (row["p_less_accurate"] <= 0.05)
    walsh = [(a + b) / 2 for i, a in enumerate(d) for b in d[i:]]
    assert row["accuracy_difference"] == pytest.approx(np.median(walsh))
    assert row["delta_incorrect_vs_of"] == pytest.approx(-0.39, abs=1e-9)
    assert row["removed_negative_asymmetry"] == (row["negative_cells"] == 0)
