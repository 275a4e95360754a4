"""The loss of every condition against PROTOCOL section 2, computed by hand in numpy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdaudit.conditions import CONDITIONS, Condition
from kdaudit.conditions.objectives import (
    VECTOR_CLASSES,
    Batch,
    StackedLosses,
    build_objective,
    cross_entropy_and_grad,
    distillation_loss,
    log_softmax,
    softened,
)
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


@pytest.mark.parametrize("classes", [10, 65, 1000])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_targets_from_the_cached_table_equal_a_per_batch_log_softmax_bit_for_bit(classes, T):
    """The table of softened targets, made once, gives the rows that computing them per batch
    gives: the cached path changes no bit of any student (and so no paired result)."""
    gen = torch.Generator().manual_seed(classes)
    logits = torch.randn(3000, classes, generator=gen) * torch.rand(3000, 1, generator=gen) * 30
    targets = cached_targets(logits)
    for size in (1, 7, 128, 3000):
        idx = torch.randint(len(logits), (size,), generator=gen)
        batch = Batch(idx, torch.empty(0), torch.zeros(size, dtype=torch.long))
        assert torch.equal(targets(batch), logits[idx])
        table_rows = targets.log_probs(batch, T, torch.float32)
        per_batch = softened(lambda b: logits[b.idx], batch, T, torch.float32)
        assert torch.equal(table_rows, per_batch)
        torch.testing.assert_close(table_rows, F.log_softmax(logits[idx] / T, dim=-1))
    assert len(targets._tables) == 1  # one table per temperature, not one per batch


def test_kd_trains_the_same_student_from_cached_logits_as_from_the_logits_per_batch():
    """The whole KD objective (loss and gradient) with the table, against the same objective
    given the teacher's logits per batch (no table): equal bit for bit at T = 1 and T = 2."""
    gen = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(500, 10, generator=gen) * 4
    y = torch.randint(10, (500,), generator=gen)
    for T in (1.0, 2.0):
        grads = []
        for teacher in (cached_targets(teacher_logits), lambda b: teacher_logits[b.idx]):
            objective = build_objective("kd", 0.5, T, 10, teacher)
            z = torch.randn(64, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
            idx = torch.arange(64) * 7
            loss = objective(z, Batch(idx, torch.empty(0), y[idx]))
            loss.backward()
            grads.append((loss.detach(), z.grad))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("classes", [2, 3, 10, 15, 16, 65])
def test_the_losses_log_softmax_is_torchs_function_and_gradient(classes):
    """The padded form (fewer than VECTOR_CLASSES classes on the CPU) against torch's
    log_softmax in float64, values and gradients, with rows of extreme logits, a -inf logit
    (a class ruled out) and a row of equal logits."""
    gen = torch.Generator().manual_seed(classes)
    z = torch.randn(200, classes, generator=gen) * 20
    z[0] = 0.0
    z[1, 0] = 1e4
    z[2, -1] = -1e4
    if classes > 1:
        z[3, 1] = -math.inf
    z.requires_grad_()
    out = log_softmax(z)
    assert out.shape == z.shape and out.dtype == z.dtype
    reference = F.log_softmax(z.detach().double(), dim=-1)
    finite = torch.isfinite(reference)
    torch.testing.assert_close(out[finite].double(), reference[finite], rtol=1e-6, atol=1e-5)
    assert torch.equal(torch.isinf(out), torch.isinf(reference))
    weights = torch.randn(200, classes, generator=gen).masked_fill(~finite, 0)
    (grad,) = torch.autograd.grad((out.masked_fill(~finite, 0) * weights).sum(), z)
    z64 = z.detach().double().requires_grad_()
    ref = F.log_softmax(z64, dim=-1)
    (grad64,) = torch.autograd.grad((ref.masked_fill(~finite, 0) * weights.double()).sum(), z64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-5)
    padded = classes < VECTOR_CLASSES
    assert padded == (classes in (2, 3, 10, 15))


def _formula(z, y, target_log_probs, alpha, T):
    """distillation_loss written out with torch's operators, differentiated by autograd."""
    ce = F.cross_entropy(z, y)
    log_q = F.log_softmax(z / T, dim=-1)
    kl = F.kl_div(log_q, target_log_probs.expand_as(log_q), reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * T**2 * kl


@pytest.mark.parametrize("classes", [2, 10, 65])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("uniform", [False, True])
def test_distillation_gradient_is_the_formulas_autograd_gradient(classes, T, alpha, uniform):
    """The written-out gradient against autograd through the formula in float64, in float32
    and float64, for a target per row and the (1, K) uniform one (RCD), with a row of large
    logits; scaled by the caller's gradient (a loss times 3)."""
    gen = torch.Generator().manual_seed(classes)
    n = 50
    z = torch.randn(n, classes, generator=gen, dtype=torch.float64) * 4
    z[0, 0] = 80.0
    y = torch.randint(classes, (n,), generator=gen)
    if uniform:
        t = torch.full((1, classes), -math.log(classes), dtype=torch.float64)
    else:
        t = F.log_softmax(torch.randn(n, classes, generator=gen, dtype=torch.float64) * 3, -1)
    z64 = z.clone().requires_grad_()
    reference = _formula(z64, y, t, alpha, T)
    (g_ref,) = torch.autograd.grad(3 * reference, z64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        zd = z.to(dtype).requires_grad_()
        loss = distillation_loss(zd, y, t.to(dtype), alpha, T)
        (g,) = torch.autograd.grad(3 * loss, zd)
        assert loss.dtype == dtype and g.dtype == dtype
        torch.testing.assert_close(loss.double(), reference.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("shape", [(1, 10), (16, 10), (128, 10), (100, 65), (37, 1000)])
def test_cross_entropy_and_grad_is_torchs_bit_for_bit(shape):
    """The CE inside distillation_loss: F.cross_entropy's value and autograd gradient, equal
    bit for bit, with a label ignored (-100) as in padded sequences."""
    gen = torch.Generator().manual_seed(shape[1])
    z = (torch.randn(shape, generator=gen) * 5).requires_grad_()
    y = torch.randint(shape[1], (shape[0],), generator=gen)
    if shape[0] > 1:
        y[1] = -100
    loss = F.cross_entropy(z, y)
    (g,) = torch.autograd.grad(loss, z)
    value, grad, log_p = cross_entropy_and_grad(z.detach(), y)
    assert torch.equal(value, loss.detach()) and torch.equal(grad, g)
    assert torch.equal(log_p, F.log_softmax(z.detach(), dim=-1))


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_distillation_at_alpha_zero_is_cross_entropy_bit_for_bit(T):
    """At alpha = 0 distillation_loss's value and gradient are F.cross_entropy's, bit for bit:
    the step the protocol's pairing proof rests on (tests/test_protocol.py runs it whole)."""
    gen = torch.Generator().manual_seed(7)
    z = (torch.randn(128, 10, generator=gen) * 3).requires_grad_()
    y = torch.randint(10, (128,), generator=gen)
    t = F.log_softmax(torch.randn(128, 10, generator=gen), -1)
    ce = F.cross_entropy(z, y)
    (g_ce,) = torch.autograd.grad(ce, z)
    kd = distillation_loss(z, y, t, 0.0, T)
    (g_kd,) = torch.autograd.grad(kd, z)
    assert torch.equal(kd.detach(), ce.detach()) and torch.equal(g_kd, g_ce)


def test_a_nan_logit_makes_the_loss_and_its_gradient_nan():
    """The loop finds a diverged run by its loss: NaN logits give a NaN loss and gradient."""
    z = torch.randn(8, 5)
    z[3, 2] = math.nan
    z.requires_grad_()
    loss = build_objective("rcd", 0.5, 2.0, 5)(z, _batch([0, 1, 2, 3, 4, 0, 1, 2]))
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isnan(loss) and torch.isnan(g[3]).all()


def _stack_of_objectives(classes: int, temperatures: list[float], gen) -> list:
    """SIDDO, KD at alpha 0 to 0.9 and RCD, at every temperature, two teachers."""
    teachers = [cached_targets(torch.randn(300, classes, generator=gen) * 4) for _ in range(2)]
    out = [build_objective("siddo", 0.0, 1.0, classes)]
    for i, (alpha, T) in enumerate([(a, T) for a in (0.0, 0.1, 0.5, 0.9) for T in temperatures]):
        out.append(build_objective("kd", alpha, T, classes, teachers[i % 2]))
        out.append(build_objective("rcd", alpha, T, classes))
    return out


@pytest.mark.parametrize(
    ("rows", "classes", "temperatures"),
    [(128, 10, [1.0]), (100, 3, [1.0, 2.0]), (17, 7, [4.0]), (16, 100, [1.0, 3.0])],
)
def test_a_stack_of_the_papers_objectives_gives_each_model_its_own_gradient_bit_for_bit(
    rows, classes, temperatures
):
    """StackedLosses against each objective alone: the gradient in every model's logits
    equal bit for bit (so a stack trains each model as its own objective would), the loss
    values to rounding. Shapes whose rows * classes leave vector tails, models of two data
    seeds (two batches), two teachers, T = 1 and T > 1, KD at alpha = 0."""
    gen = torch.Generator().manual_seed(rows + classes)
    objectives = _stack_of_objectives(classes, temperatures, gen)
    batches = [_batch(torch.randint(classes, (rows,), generator=gen).tolist(),
                      torch.randperm(300, generator=gen)[:rows]) for _ in range(2)]  # fmt: skip
    of_model = [batches[k % 2] for k in range(len(objectives))]
    z = (torch.randn(len(objectives), rows, classes, generator=gen) * 5).requires_grad_()
    together = StackedLosses.of(objectives)(z, of_model)
    (g,) = torch.autograd.grad(together.sum(), z)
    for k, (objective, batch) in enumerate(zip(objectives, of_model, strict=True)):
        zk = z.detach()[k].clone().requires_grad_()
        alone = objective(zk, batch)
        (gk,) = torch.autograd.grad(alone, zk)
        assert torch.equal(g[k], gk), k
        torch.testing.assert_close(together[k].detach(), alone.detach(), rtol=1e-6, atol=1e-7)


def test_a_stack_of_the_papers_objectives_against_the_formula_in_float64():
    """The stacked losses and gradients against distillation_loss's formula differentiated
    by autograd in float64 (an independent computation)."""
    gen = torch.Generator().manual_seed(3)
    objectives = _stack_of_objectives(10, [1.0, 2.0], gen)
    batch = _batch(torch.randint(10, (64,), generator=gen).tolist(), torch.arange(64))
    z = (torch.randn(len(objectives), 64, 10, generator=gen) * 3).requires_grad_()
    together = StackedLosses.of(objectives)(z, [batch] * len(objectives))
    (g,) = torch.autograd.grad(together.sum(), z)
    for k, o in enumerate(objectives):
        z64 = z.detach()[k].double().requires_grad_()
        if o.plain:
            expected = F.cross_entropy(z64, batch.y)
        else:
            target = o.target(batch, torch.float64, z64.device).expand(64, 10)
            expected = _formula(z64, batch.y, target, o.alpha, o.temperature)
        (g64,) = torch.autograd.grad(expected, z64)
        torch.testing.assert_close(together[k].double(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g[k].double(), g64, rtol=1e-4, atol=1e-7)


def test_only_stacks_of_the_papers_objectives_are_computed_together():
    """Any other objective (label smoothing, a remedy, your own loss) keeps the stack's
    objectives one by one."""
    assert StackedLosses.of([build_objective(c, 0.5, 1.0, 10, _teacher()) for c in
                             ("siddo", "kd", "rcd")]) is not None  # fmt: skip
    for other in ("ls", "kd_masked"):
        objectives = [build_objective("siddo", 0.0, 1.0, 10), build_objective(other, 0.5, 1.0,
                      10, _teacher())]  # fmt: skip
        assert StackedLosses.of(objectives) is None
    assert StackedLosses.of([lambda z, b: z.sum()]) is None


def _teacher():
    return cached_targets(torch.randn(50, 10))
