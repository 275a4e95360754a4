"""The loss of every condition against PROTOCOL section 2, computed by hand in numpy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdaudit.conditions import CONDITIONS, Condition
from kdaudit.conditions.objectives import Batch, build_objective, distillation_loss
from kdaudit.engine.teachers import cached_targets, model_targets


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _by_hand(zs, y, p_target, alpha, T):
    """(1-a) CE + a T^2 KL(p || softmax(zs/T)), KL summed over classes, mean over examples."""
    ce = -_log_softmax(zs)[np.arange(len(y)), y].mean()
    log_q = _log_softmax(zs / T)
    kl = np.where(p_target > 0, p_target * (np.log(p_target) - log_q), 0).sum(axis=1).mean()
    return (1 - alpha) * ce + alpha * T**2 * kl


def _batch(y, idx=None):
    y = torch.tensor(y)
    return Batch(torch.arange(len(y)) if idx is None else idx, torch.empty(0), y)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(size=(2, 8, 5)) * 3
    y = rng.integers(0, 5, size=8)
    return zs, zt, y


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_loss_matches_the_formula(batch, alpha, T):
    zs, zt, y = batch
    teacher = torch.tensor(zt, dtype=torch.float64)
    obj = build_objective("kd", alpha, T, 5, cached_targets(teacher))
    got = obj(torch.tensor(zs), _batch(y))
    p_t = np.exp(_log_softmax(zt / T))
    assert got.item() == pytest.approx(_by_hand(zs, y, p_t, alpha, T), rel=1e-12)


def test_kd_looks_up_the_teacher_outputs_of_the_batch_indices(batch):
    zs, zt, y = batch
    teacher = torch.tensor(np.concatenate([np.zeros((3, 5)), zt]))  # batch rows start at 3
    obj = build_objective("kd", 0.7, 2.0, 5, cached_targets(teacher))
    got = obj(torch.tensor(zs), _batch(y, torch.arange(3, 11)))
    assert got.item() == pytest.approx(
        _by_hand(zs, y, np.exp(_log_softmax(zt / 2)), 0.7, 2), rel=1e-12
    )


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_rcd_targets_the_uniform_distribution(batch, T):
    zs, _, y = batch
    got = build_objective("rcd", 0.5, T, 5)(torch.tensor(zs), _batch(y))
    assert got.item() == pytest.approx(_by_hand(zs, y, np.full((8, 5), 0.2), 0.5, T), rel=1e-12)


@pytest.mark.parametrize("name", ["teacher", "siddo"])
def test_plain_cross_entropy_conditions(batch, name):
    zs, _, y = batch
    got = build_objective(name, None, None, 5)(torch.tensor(zs), _batch(y))
    assert got.item() == pytest.approx(-_log_softmax(zs)[np.arange(8), y].mean(), rel=1e-12)


def test_label_smoothing_equals_rcd_at_t1_up_to_a_constant(batch):
    """LS(eps) = (1-eps) CE + eps CE(uniform) = RCD(alpha=eps, T=1) + eps * log K."""
    zs, _, y = batch
    z = torch.tensor(zs, requires_grad=True)
    ls = build_objective("ls", 0.3, None, 5)(z, _batch(y))
    rcd = build_objective("rcd", 0.3, 1.0, 5)(z, _batch(y))
    assert (ls - rcd).item() == pytest.approx(0.3 * math.log(5), rel=1e-12)
    (g_ls,) = torch.autograd.grad(ls, z)
    (g_rcd,) = torch.autograd.grad(rcd, z)
    torch.testing.assert_close(g_ls, g_rcd, rtol=1e-12, atol=1e-12)


def test_distillation_loss_is_batchmean_and_scales_by_t_squared():
    z = torch.zeros(4, 3)
    target = F.log_softmax(torch.tensor([[5.0, 0.0, 0.0]]), dim=-1)
    y = torch.zeros(4, dtype=torch.long)
    only_kl = distillation_loss(z, y, target, 1.0, 2.0)
    kl_one_row = F.kl_div(F.log_softmax(z[:1] / 2, -1), target, reduction="sum", log_target=True)
    assert only_kl.item() == pytest.approx(
        4 * kl_one_row.item(), rel=1e-6
    )  # T^2 = 4, mean over rows


def test_kd_without_teacher_outputs_is_an_error():
    with pytest.raises(ValueError, match="needs the teacher"):
        build_objective("kd", 0.5, 1.0, 5)


def test_every_condition_is_registered_with_its_grid_axes():
    assert set(CONDITIONS.names()) >= {"teacher", "siddo", "kd", "rcd", "ls"}
    for entry in CONDITIONS.entries():  # typed descriptions, no untyped info dicts
        assert isinstance(entry, Condition) and set(entry.params) <= {"alpha", "temperature"}
        assert all(CONDITIONS.get(c).role == "control" for c in entry.controls)
    with pytest.raises(KeyError, match="unknown condition 'nope'; registered: "):
        CONDITIONS.get("nope")


def test_model_targets_run_the_teacher_on_the_augmented_batch():
    """With augmentation the KD target is the teacher's output on exactly the batch the
    student sees, computed without gradients and in eval mode."""
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    teacher.train()
    x = torch.randn(6, 4)
    targets = model_targets(teacher)(Batch(torch.arange(6), x, torch.zeros(6, dtype=torch.long)))
    assert not teacher.training and not targets.requires_grad
    torch.testing.assert_close(targets, teacher[0](x))
