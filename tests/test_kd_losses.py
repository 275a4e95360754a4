"""examples/kd_losses.py against independent float64 numpy/scipy computations."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import log_softmax, rel_entr, softmax

_PATH = Path(__file__).resolve().parents[1] / "examples" / "kd_losses.py"
_spec = importlib.util.spec_from_file_location("kd_losses_example", _PATH)
kd_losses = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kd_losses)

LOSSES = {"reverse_kl": kd_losses.reverse_kl, "dkd": kd_losses.dkd}
SHAPES = [(1, 2), (4, 3), (16, 10), (7, 100)]
TEMPERATURES = [0.5, 1.0, 2.0, 4.0]
ALPHAS = [0.0, 0.3, 0.9, 1.0]
CASES = list(itertools.product(SHAPES, TEMPERATURES, ALPHAS))


def make_batch(shape, seed=0, scale=3.0):
    """Random (B, K) float32 student/teacher logits and (B,) labels; seed fixed per case."""
    rng = np.random.default_rng(seed)
    b, k = shape
    z_s = (scale * rng.standard_normal((b, k))).astype(np.float32)
    z_t = (scale * rng.standard_normal((b, k))).astype(np.float32)
    y = rng.integers(0, k, size=b)
    return z_s, z_t, y


def as_torch(z_s, z_t, y, dtype=torch.float32):
    return (
        torch.tensor(z_s, dtype=dtype, requires_grad=True),
        torch.tensor(z_t, dtype=dtype),
        torch.tensor(y, dtype=torch.int64),
    )


# float32 (the user-loss dtype): 1e-5 relative, plus an absolute floor for values near 0 (alpha = 1,
# close distributions): a float32 log-probability of logits up to |z/T| ~ 25 carries ~25 * 1.2e-7
# = 3e-6 of rounding, so a KL of ~1e-4 cannot be right to 1e-5 relative in float32.
# float64 (same code, same float32-valued inputs): the formulas themselves agree to ~1e-10.
TOL = {torch.float32: dict(rel=1e-5, abs=1e-5), torch.float64: dict(rel=1e-10, abs=1e-13)}
DTYPES = list(TOL)


def np_ce(z_s, y):
    """Mean cross-entropy at T = 1, float64."""
    logp = log_softmax(z_s.astype(np.float64), axis=1)
    return -logp[np.arange(len(y)), y].mean()


def np_reverse_kl(z_s, z_t, y, a, t):
    q = softmax(z_s.astype(np.float64) / t, axis=1)  # student
    p = softmax(z_t.astype(np.float64) / t, axis=1)  # teacher
    kl = rel_entr(q, p).sum(axis=1).mean()  # sum_k q log(q / p)
    return (1 - a) * np_ce(z_s, y) + a * t**2 * kl


def np_dkd_parts(z_s, z_t, y, t):
    """Per-example TCKD and NCKD by explicit loops over examples, float64."""
    tckd, nckd = [], []
    for zs, zt, yi in zip(z_s.astype(np.float64), z_t.astype(np.float64), y, strict=True):
        ps, pt = softmax(zs / t), softmax(zt / t)
        keep = np.arange(len(zs)) != yi  # the non-target classes
        # 1 - p_true as the sum of the other probabilities: no cancellation when p_true ~ 1.
        b_s = np.array([ps[yi], ps[keep].sum()])
        b_t = np.array([pt[yi], pt[keep].sum()])
        tckd.append(rel_entr(b_t, b_s).sum())
        n_s, n_t = ps[keep] / ps[keep].sum(), pt[keep] / pt[keep].sum()
        nckd.append(rel_entr(n_t, n_s).sum())
    return np.array(tckd), np.array(nckd)


def np_dkd(z_s, z_t, y, a, t, beta=8.0):
    tckd, nckd = np_dkd_parts(z_s, z_t, y, t)
    return (1 - a) * np_ce(z_s, y) + a * t**2 * (tckd + beta * nckd).mean()


def test_beta_is_papers_default():
    assert kd_losses.DKD_BETA == 8.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,t,a", CASES)
def test_reverse_kl_matches_numpy(shape, t, a, dtype):
    z_s, z_t, y = make_batch(shape, seed=CASES.index((shape, t, a)))
    got = kd_losses.reverse_kl(*as_torch(z_s, z_t, y, dtype), a, t)
    assert got.item() == pytest.approx(np_reverse_kl(z_s, z_t, y, a, t), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,t,a", CASES)
def test_dkd_matches_numpy(shape, t, a, dtype):
    z_s, z_t, y = make_batch(shape, seed=CASES.index((shape, t, a)))
    got = kd_losses.dkd(*as_torch(z_s, z_t, y, dtype), a, t)
    assert got.item() == pytest.approx(np_dkd(z_s, z_t, y, a, t), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,t", list(itertools.product(SHAPES, TEMPERATURES)))
def test_dkd_parts_match_numpy(shape, t, dtype):
    z_s, z_t, y = make_batch(shape, seed=1)
    tckd, nckd = kd_losses.dkd_parts(*as_torch(z_s, z_t, y, dtype), t)
    assert tckd.shape == nckd.shape == (shape[0],)
    want_t, want_n = np_dkd_parts(z_s, z_t, y, t)
    rtol, atol = TOL[dtype]["rel"], TOL[dtype]["abs"]
    np.testing.assert_allclose(tckd.detach().numpy(), want_t, rtol=rtol, atol=atol)
    np.testing.assert_allclose(nckd.detach().numpy(), want_n, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("t", TEMPERATURES)
def test_alpha_zero_is_cross_entropy_exactly(name, t):
    z_s, z_t, y = as_torch(*make_batch((16, 10), seed=2))
    got = LOSSES[name](z_s, z_t, y, 0.0, t)
    assert torch.equal(got, F.cross_entropy(z_s, y))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("t,a", list(itertools.product(TEMPERATURES, ALPHAS)))
def test_identical_logits_teacher_term_is_zero(name, t, a):
    z, _, y = make_batch((16, 10), seed=3)
    z_s, z_t, y = as_torch(z, z.copy(), y)
    got = LOSSES[name](z_s, z_t, y, a, t)
    want = (1 - a) * F.cross_entropy(z_s, y)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("shape,t", list(itertools.product(SHAPES, TEMPERATURES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dkd_decomposition_is_classical_kl(shape, t, dtype):
    """Eq. (1) of the DKD paper: KL(p_t || p_s) = TCKD + (1 - p_t,true) * NCKD, per example."""
    z_s, z_t, y = make_batch(shape, seed=4)
    z_s, z_t, y = torch.tensor(z_s, dtype=dtype), torch.tensor(z_t, dtype=dtype), torch.tensor(y)
    tckd, nckd = kd_losses.dkd_parts(z_s, z_t, y, t)
    p_t_true = F.softmax(z_t / t, dim=-1).gather(1, y[:, None]).squeeze(1)
    log_p_s, log_p_t = F.log_softmax(z_s / t, dim=-1), F.log_softmax(z_t / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # classical KD's KL, (B,)
    # float32 rounding of the per-term sums is ~1e-7 absolute; the identity is exact in float64.
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (1e-12, 0.0)
    torch.testing.assert_close(tckd + (1 - p_t_true) * nckd, kl, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("t", TEMPERATURES)
def test_gradients_are_finite(name, t):
    z_s, z_t, y = as_torch(*make_batch((16, 10), seed=5))
    loss = LOSSES[name](z_s, z_t, y, 0.5, t)
    loss.backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all()
    assert z_s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
def test_extreme_logits_stay_finite(name, t, a):
    """Logits of +-80: probabilities of exactly 0 or 1 in float32, log space keeps them finite."""
    rng = np.random.default_rng(6)
    b, k = 12, 10
    z_s = torch.tensor(rng.choice([-80.0, 80.0], size=(b, k)), dtype=torch.float32)
    z_t = torch.tensor(rng.choice([-80.0, 80.0], size=(b, k)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, k, size=b))
    # Cover both ends: true class far above the rest (p_true -> 1) and far below (p_true -> 0).
    z_s[0], z_t[0] = -80.0, -80.0
    z_s[0, y[0]], z_t[0, y[0]] = 80.0, 80.0
    z_s[1], z_t[1] = 80.0, -80.0
    z_s[1, y[1]], z_t[1, y[1]] = -80.0, 80.0
    z_s.requires_grad_(True)
    loss = LOSSES[name](z_s, z_t, y, a, t)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z_s.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_returns_scalar(name):
    z_s, z_t, y = as_torch(*make_batch((8, 5), seed=7))
    loss = LOSSES[name](z_s, z_t, y, 0.5, 2.0)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.dtype == torch.float32
