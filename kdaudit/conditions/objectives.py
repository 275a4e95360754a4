"""The objectives of the conditions (PROTOCOL section 2): one loss form, different targets.

An objective is `objective(logits, batch) -> loss`. The training loop is the same for every
condition; only the objective differs. The paper's own (SIDDO, KD, RCD) are one
`Distillation` each, which a stack of models computes at once (`StackedLosses`). KD gets the
teacher's logits for a batch from a `TeacherTargets` callable (kdaudit.engine.teachers: cached
per example, or a teacher forward pass on the batch). Feature-map objectives (kdaudit.conditions.features) hook the student
model and train parameters of their own; the loop adds those to the optimizer.

Every builder has one signature, `build(condition, alpha, temperature, num_classes, teacher,
student)`, and is named by its registry entry (kdaudit.conditions).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdaudit.conditions import CONDITIONS, Condition, resolve
from kdaudit.errors import UserCodeError


@dataclass(frozen=True)
class Batch:
    idx: torch.Tensor  # (B,) training-set indices
    x: torch.Tensor  # (B, ...) model inputs, after augmentation and normalisation
    y: torch.Tensor  # (B,) labels


Objective = Callable[[torch.Tensor, Batch], torch.Tensor]  # (logits (B, K), batch) -> loss
TeacherTargets = Callable[[Batch], torch.Tensor]  # batch -> teacher logits (B, K)


class CachedTargets:
    """The teacher's logits per training example (N, K), looked up per batch: the
    TeacherTargets of students whose batches are unaugmented rows of the training set.

    `log_probs` gives a batch's softened targets log_softmax(z_t / T) from a table made once
    per (temperature, dtype) for the whole set: the same values, bit for bit, as computing
    them per batch (a row's log_softmax reads that row alone; tests/test_conditions.py), without
    the per-step log_softmax. The table is shared by every student given this object."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # (N, K)
        self._tables: dict[tuple[float, torch.dtype], torch.Tensor] = {}

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.logits.index_select(0, batch.idx)

    def log_probs(self, batch: Batch, temperature: float, dtype: torch.dtype) -> torch.Tensor:
        key = (temperature, dtype)
        if key not in self._tables:
            self._tables[key] = log_softmax(scaled(self.logits.to(dtype), temperature))
        return self._tables[key].index_select(0, batch.idx)


# Below this many classes torch's CPU log_softmax over the last dim leaves its vectorised
# kernel: 22 us for a (128, 10) batch against 3.4 us for (128, 16) on an AVX-512 CPU (measured).
VECTOR_CLASSES = 16


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the classes (the last dim): the student's and the teacher's softened
    distributions in the distillation terms (the CE is torch's, as SIDDO's). On the
    CPU with fewer than VECTOR_CLASSES classes each row is padded with -inf up to that many
    and the padding cut off after: exp(-inf) = 0 adds nothing to a row's sum, so it is the
    same function, computed by torch's vectorised kernel (tests/test_conditions.py)."""
    k = logits.shape[-1]
    if logits.device.type != "cpu" or k >= VECTOR_CLASSES:
        return F.log_softmax(logits, dim=-1)
    padded = F.pad(logits, (0, VECTOR_CLASSES - k), value=-math.inf)
    return F.log_softmax(padded, dim=-1)[..., :k]


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T, skipped at T = 1, where the division changes no bit (nor its gradient)."""
    return logits if temperature == 1 else logits / temperature


def softened(teacher: TeacherTargets, batch: Batch, temperature: float, dtype) -> torch.Tensor:
    """The teacher's softened log-probabilities log_softmax(z_t / T) on the batch (B, K)."""
    if isinstance(teacher, CachedTargets):
        return teacher.log_probs(batch, temperature, dtype)
    return log_softmax(scaled(teacher(batch).to(dtype), temperature))


def build_objective(
    name: str,
    alpha,
    temperature,
    num_classes: int,
    teacher=None,  # TeacherTargets; a kdaudit.conditions.features.FeatureSetup for feature conditions
    student: nn.Module | None = None,  # the model to train (feature conditions hook it)
) -> Objective:
    entry = CONDITIONS.get(name)
    if entry.needs_teacher and teacher is None:
        raise ValueError(f"condition {name!r} needs the teacher's outputs")
    if entry.features and student is None:
        raise ValueError(f"condition {name!r} hooks the student: pass student=")
    return resolve(entry.objective)(entry, alpha, temperature, num_classes, teacher, student)


def objective_parameters(objective: Objective) -> list[torch.Tensor]:
    """Parameters an objective trains beside the model's (feature-map projections)."""
    return list(objective.parameters()) if isinstance(objective, nn.Module) else []


def distillation_loss(
    logits: torch.Tensor,  # (B, K) student logits
    labels: torch.Tensor,  # (B,)
    target_log_probs: torch.Tensor,  # (B, K) or (1, K): log of the softened target distribution
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """(1 - alpha) CE(y, softmax(z)) + alpha T^2 KL(target || softmax(z / T)), KL batchmean,
    with its gradient in the logits written out (`_Distillation`). The CE and its gradient
    are torch's F.cross_entropy's, bit for bit, as SIDDO's: at alpha = 0 the loss, its
    gradient and so the trained model are SIDDO's bit for bit, the proof that the runs are
    paired."""
    return _Distillation.apply(logits, labels, target_log_probs, alpha, temperature)


class _Distillation(torch.autograd.Function):
    """distillation_loss: its value and, in the same pass, its gradient in the logits,
    (1 - alpha) dCE/dz + alpha T (softmax(z / T) - p) / B with p the target distribution
    (d/dz of T^2 KL(p || softmax(z / T)) is T (softmax(z / T) - p), as p sums to 1). One
    autograd node instead of the formula's fifteen or so small operators, each of which
    costs about as much as its arithmetic on a (128, 10) batch: a fifth of a small MLP's
    step on the CPU. Checked against the formula's autograd gradient in float64
    (tests/test_conditions.py)."""

    @staticmethod
    def forward(ctx, logits, labels, target_log_probs, alpha: float, temperature: float):
        ce, ce_grad, log_p = cross_entropy_and_grad(logits, labels)
        log_q = log_p if temperature == 1 else log_softmax(logits / temperature)
        p = target_log_probs.exp()  # (B, K) or (1, K)
        n = len(logits)
        kl = (p * (target_log_probs - log_q)).sum() / n  # F.kl_div's batchmean, log target
        # At alpha = 0: ce_grad * 1 + 0 * (...) is ce_grad, bit for bit (the terms are finite).
        grad = torch.add(ce_grad * (1.0 - alpha), log_q.exp() - p, alpha=alpha * temperature / n)
        ctx.save_for_backward(grad)
        return torch.add(ce * (1.0 - alpha), kl, alpha=alpha * temperature**2)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


def cross_entropy_and_grad(logits: torch.Tensor, labels: torch.Tensor):
    """F.cross_entropy(logits (B, K), labels (B,)) (the batch mean), its gradient in the logits
    and log_softmax(logits), by the operators torch's autograd runs for it: bit for bit its
    value and gradient (tests/test_conditions.py)."""
    aten = torch.ops.aten
    log_p = aten._log_softmax(logits, 1, False)
    ce, total_weight = aten.nll_loss_forward(log_p, labels, None, 1, -100)  # 1: mean
    one = torch.ones((), dtype=logits.dtype, device=logits.device)
    grad = aten.nll_loss_backward(one, log_p, labels, None, 1, -100, total_weight)
    return ce, aten._log_softmax_backward_data(grad, log_p, 1, logits.dtype), log_p


class Distillation:
    """The objective of the paper's conditions: (1 - alpha) CE(y, softmax(z)) + alpha T^2
    KL(target || softmax(z / T)), toward the teacher's softened distribution (KD,
    `teacher`), the class-uniform one (RCD, `num_classes`), or none: plain CE (SIDDO, the
    teacher). A stack of them is computed at once by `StackedLosses`."""

    def __init__(self, alpha: float = 0.0, temperature: float = 1.0,
                 teacher: TeacherTargets | None = None, num_classes: int | None = None):  # fmt: skip
        self.alpha, self.temperature = alpha, temperature
        self.teacher, self.num_classes = teacher, num_classes

    @property
    def plain(self) -> bool:
        """Plain CE: no target."""
        return self.teacher is None and self.num_classes is None

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.plain:  # torch's own: a user's loss built on F.cross_entropy gives these bits
            return F.cross_entropy(logits, batch.y)
        target = self.target(batch, logits.dtype, logits.device)
        return distillation_loss(logits, batch.y, target, self.alpha, self.temperature)

    def target(self, batch: Batch, dtype, device) -> torch.Tensor:
        """log of the target distribution: (B, K) the teacher's softened, (1, K) uniform."""
        if self.teacher is not None:
            return softened(self.teacher, batch, self.temperature, dtype)
        log_u = -math.log(self.num_classes)
        return torch.full((1, self.num_classes), log_u, dtype=dtype, device=device)


def cross_entropy(condition, alpha, temperature, num_classes, teacher, student) -> Objective:
    """Plain CE: the teacher, and SIDDO (same init, different data order)."""
    return Distillation()


def kd(condition, alpha, temperature, num_classes, teacher: TeacherTargets, student) -> Objective:
    """Target: the trained teacher's softened distribution on the same batch."""
    return Distillation(alpha, temperature, teacher=teacher)


def rcd(condition, alpha, temperature, num_classes, teacher, student) -> Objective:
    """Random control distillation: the KD loss form with the class-uniform target u = 1/K."""
    return Distillation(alpha, temperature, num_classes=num_classes)


class StackedLosses:
    """The losses (K,) of K models trained as one stack whose objectives are all
    `Distillation`s (`of` gives None otherwise): model k's logits (K, B, C) or (K, B, T, V)
    by objectives[k] on batches[k], in one pass over the stack instead of some twenty small
    operators per model. Each model's gradient is, bit for bit, the one its objective gives
    it alone (tests/test_conditions.py); the loss values agree to rounding. Labels are class
    indices (the engine's batches leave no position out)."""

    def __init__(self, objectives: list[Distillation]):
        self.objectives = objectives
        self.plain = all(o.plain for o in objectives)  # no targets: plain CE only
        self._plans: dict[tuple, _StackPlan] = {}  # made once per stack and device

    @classmethod
    def of(cls, objectives: list) -> StackedLosses | None:
        return cls(objectives) if all(type(o) is Distillation for o in objectives) else None

    def __call__(self, logits: torch.Tensor, batches: list[Batch]) -> torch.Tensor:
        z = logits.reshape(len(self.objectives), -1, logits.shape[-1])  # (K, R, C)
        labels = torch.stack([b.y for b in batches])  # (K, R)
        if self.plain:
            return _StackedDistillation.apply(z, labels, None, None)
        log_targets, which = self._targets(batches, z)
        return _StackedDistillation.apply(z, labels, log_targets, self._plan(which, z))

    def _targets(self, batches: list[Batch], z: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The distinct target log-probabilities (D, R, C), zeros first for plain CE (alpha
        = 0 there), and which one each model has. The KD students of one seed share their
        batch, so one lookup serves them all."""
        r, c = z.shape[1:]
        keys = [None if o.plain else (id(o.teacher), o.temperature, id(b), o.num_classes)
                for o, b in zip(self.objectives, batches, strict=True)]  # fmt: skip
        distinct = {None: torch.zeros(r, c, dtype=z.dtype, device=z.device)}
        for o, b, key in zip(self.objectives, batches, keys, strict=True):
            if key not in distinct:
                distinct[key] = o.target(b, z.dtype, z.device).expand(r, c)
        order = list(distinct)
        return torch.stack(list(distinct.values())), tuple(order.index(k) for k in keys)

    def _plan(self, which: tuple, z: torch.Tensor) -> _StackPlan:
        """The stack's constants on the logits' device, made once (no copy to a GPU a step)."""
        key = (which, z.dtype, z.device)
        if key not in self._plans:
            self._plans[key] = _StackPlan.make(self.objectives, which, z)
        return self._plans[key]


@dataclass(frozen=True)
class _StackPlan:
    alphas: list[float]
    temperatures: list[float]
    targeted: list[int]  # the models with a target (all but plain CE)
    which: torch.Tensor  # (K,) each model's row of the distinct targets
    scale: torch.Tensor  # (K, 1, 1) 1 - alpha
    t2: torch.Tensor  # (K,) alpha T^2

    @classmethod
    def make(cls, objectives: list[Distillation], which: tuple, z: torch.Tensor) -> _StackPlan:
        alphas = [o.alpha for o in objectives]
        temperatures = [o.temperature for o in objectives]
        t2 = [a * t * t for a, t in zip(alphas, temperatures, strict=True)]
        like = {"dtype": z.dtype, "device": z.device}
        return cls(alphas, temperatures, [k for k, o in enumerate(objectives) if not o.plain],
                   torch.tensor(which, device=z.device),
                   torch.tensor([1.0 - a for a in alphas], **like).view(-1, 1, 1),
                   torch.tensor(t2, **like))  # fmt: skip


class _StackedDistillation(torch.autograd.Function):
    """`Distillation` of K models at once: the operators of `_Distillation` (and, for plain
    CE, of F.cross_entropy's autograd) on the (K * R, C) rows together. Row-wise operators
    (log_softmax and its backward) and exactly rounded elementwise ones give each model the
    bits it gets alone; the one fused multiply-add, `torch.add(..., alpha=)`, runs per model,
    as `_Distillation` runs it. The loss values are summed in another order: equal to
    rounding, and only the non-finite check and the progress display read them."""

    @staticmethod
    def forward(ctx, z, labels, log_targets, plan: _StackPlan | None):
        k, r, c = z.shape
        rows = z.reshape(k * r, c)
        log_p, ce_grad = _cross_entropy_rows(rows, labels.reshape(-1), r)
        ce = -log_p.gather(1, labels.reshape(-1, 1)).view(k, r).sum(1) / r  # (K,)
        if plan is None:  # plain CE only
            ctx.save_for_backward(ce_grad.view(k, r, c))
            return ce
        grad = ce_grad.view(k, r, c) * plan.scale  # ce_grad * (1 - alpha), as alone
        log_q = _softened_rows(rows, log_p, plan.temperatures).view(k, r, c)
        p = log_targets.exp().index_select(0, plan.which)  # (K, R, C)
        diff = log_q.exp() - p
        for i in plan.targeted:
            step = plan.alphas[i] * plan.temperatures[i] / r
            torch.add(grad[i], diff[i], alpha=step, out=grad[i])
        ctx.save_for_backward(grad)
        log_t = log_targets.index_select(0, plan.which)
        kl = (p * (log_t - log_q)).sum((1, 2)) / r  # (K,) batchmean
        return ce * plan.scale.view(k) + kl * plan.t2

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.view(-1, 1, 1), None, None, None


def _cross_entropy_rows(rows: torch.Tensor, labels: torch.Tensor, r: int):
    """log_softmax of the rows (K * R, C) and the gradient in them of each model's mean CE
    over its R rows, by `cross_entropy_and_grad`'s operators: nll_loss_backward writes
    -(1 / R), computed in the logits' dtype, at each row's label."""
    aten = torch.ops.aten
    log_p = aten._log_softmax(rows, 1, False)
    one = torch.ones((), dtype=rows.dtype)
    step = float(-(one / torch.tensor(float(r), dtype=rows.dtype)))
    grad = torch.zeros_like(rows).scatter_(1, labels.view(-1, 1), step)
    return log_p, aten._log_softmax_backward_data(grad, log_p, 1, rows.dtype)


def _softened_rows(rows: torch.Tensor, log_p: torch.Tensor, temperatures: list[float]):
    """Each model's log_softmax(z / T) (K * R, C), as `_Distillation` computes it."""
    if all(t == 1 for t in temperatures):
        return log_p
    k = len(temperatures)
    per_t = {t: log_p if t == 1 else log_softmax(rows / t) for t in set(temperatures)}
    return torch.cat([per_t[t].view(k, -1, rows.shape[1])[i] for i, t in enumerate(temperatures)])


def ls(condition, alpha, temperature, num_classes, teacher, student) -> Objective:
    """Label smoothing with epsilon = alpha (an appendix control, equivalent to RCD at T=1)."""

    def objective(logits, batch):
        return F.cross_entropy(logits, batch.y, label_smoothing=alpha)

    return objective


# ---------------------------------------------------------------- remedies
# KD changed to refuse the teacher's mistakes (PROTOCOL section 10). Each keeps KD's form,
# (1 - alpha) CE + alpha (...), so alpha = 0 trains exactly the SIDDO model, and reads the
# teacher's logits for the same batch. "Wrong" is the teacher's top-1 class != the label.


def kd_masked(condition, alpha, temperature, num_classes, teacher, student) -> Objective:
    """The KD term only on the examples the teacher classifies correctly; on the others CE
    alone: per example (1 - alpha) CE + alpha T^2 KL where the teacher is right, CE where it
    is wrong (written as (1 - alpha) CE + alpha (CE_wrong + T^2 KL_right), batch means)."""

    def objective(logits, batch):
        z_t = teacher(batch).to(logits.dtype)
        right = (z_t.argmax(-1) == batch.y).to(logits.dtype)
        log_q = log_softmax(scaled(logits, temperature))
        target = softened(teacher, batch, temperature, logits.dtype)
        kl = F.kl_div(log_q, target, reduction="none", log_target=True).sum(-1)
        ce_each = F.cross_entropy(logits, batch.y, reduction="none")
        ce = F.cross_entropy(logits, batch.y)
        n = logits.shape[0]
        rest = ((1 - right) * ce_each).sum() / n + temperature**2 * (right * kl).sum() / n
        return (1.0 - alpha) * ce + alpha * rest

    return objective


def kd_confidence(condition, alpha, temperature, num_classes, teacher, student) -> Objective:
    """The KD term of each example weighted by the teacher's probability of its true label
    (softmax at T = 1, no gradient): confident right predictions count fully, mistakes little."""

    def objective(logits, batch):
        z_t = teacher(batch).to(logits.dtype)
        weight = F.softmax(z_t, dim=-1).gather(-1, batch.y[:, None]).squeeze(-1).detach()
        log_q = log_softmax(scaled(logits, temperature))
        target = softened(teacher, batch, temperature, logits.dtype)
        kl = F.kl_div(log_q, target, reduction="none", log_target=True).sum(-1)
        ce = F.cross_entropy(logits, batch.y)
        return (1.0 - alpha) * ce + alpha * temperature**2 * (weight * kl).sum() / logits.shape[0]

    return objective


def kd_corrected(condition, alpha, temperature, num_classes, teacher, student) -> Objective:
    """KD toward a rectified target: where the teacher is wrong, the mass of its (wrong)
    top-1 class is moved to the true label; elsewhere the teacher's softened distribution."""

    def objective(logits, batch):
        z_t = teacher(batch).to(logits.dtype)
        return distillation_loss_probs(logits, batch.y, corrected_target(z_t, batch.y,
                                       temperature), alpha, temperature)  # fmt: skip

    return objective


def corrected_target(z_t: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z_t / T) with, on rows whose argmax a != y, p[y] += p[a] and p[a] = 0."""
    p = F.softmax(scaled(z_t, temperature), dim=-1)
    top = p.argmax(-1, keepdim=True)  # (B, 1)
    wrong = top != y[:, None]
    top_mass = p.gather(-1, top)
    p = p.scatter_add(-1, y[:, None], top_mass * wrong)
    return p.scatter(-1, top, torch.where(wrong, torch.zeros_like(top_mass), top_mass))


def distillation_loss_probs(logits, labels, target_probs, alpha, temperature) -> torch.Tensor:
    """distillation_loss with the target given as probabilities (zeros allowed: 0 log 0 = 0)."""
    ce = F.cross_entropy(logits, labels)
    log_q = log_softmax(scaled(logits, temperature))
    kl = F.kl_div(log_q, target_probs, reduction="batchmean", log_target=False)
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


# ---------------------------------------------------------------- your own KD loss

LossFunction = Callable[..., torch.Tensor]  # (z_s (B, K), z_t (B, K), y (B,), alpha, T) -> loss
LOSS_PARAMETERS = ("student_logits", "teacher_logits", "labels", "alpha", "temperature")


def loss_objective(condition: Condition, alpha, temperature, num_classes, teacher, student):
    """A treatment trained with the user's loss fn(student_logits, teacher_logits, labels,
    alpha, temperature) on the teacher's logits for the same batch. Its first loss is
    checked (a scalar, finite), once: after that the loop's own non-finite check applies."""
    fn = user_loss(condition)
    checked = [False]

    def objective(logits, batch):
        loss = fn(logits, teacher(batch).to(logits.dtype), batch.y, alpha, temperature)
        if not checked[0]:
            check_loss_value(loss, condition, "on the first batch")
            checked[0] = True
        return loss

    return objective


def user_loss(condition: Condition) -> LossFunction:
    """The condition's loss function, imported and its signature checked."""
    from kdaudit.user_code import import_callable

    fn = import_callable(condition.loss, f"protocol.conditions ({condition.name}).factory")
    try:
        inspect.signature(fn).bind(*LOSS_PARAMETERS)
    except TypeError as err:
        raise UserCodeError(
            f"loss {condition.loss} ({condition.name}) cannot be called as "
            f"fn({', '.join(LOSS_PARAMETERS)}): {err}; give it exactly these five parameters"
        ) from None
    except ValueError:  # no signature to read (a builtin): the first call tells
        pass
    return fn


def check_loss_value(loss, condition: Condition, where: str) -> None:
    name = f"loss {condition.loss} ({condition.name})"
    if not isinstance(loss, torch.Tensor):
        raise UserCodeError(f"{name} returned a {type(loss).__name__} {where}; return a "
                            "torch scalar (a 0-d tensor) that carries the gradient")  # fmt: skip
    if loss.dim() != 0:
        raise UserCodeError(f"{name} returned shape {tuple(loss.shape)} {where}, not a "
                            "scalar; reduce it, e.g. with .mean() over the batch")  # fmt: skip
    if not bool(torch.isfinite(loss.detach())):
        raise UserCodeError(f"{name} returned {loss.item()} {where}; check it for log(0), "
                            "division by zero or overflow (work in log space)")  # fmt: skip
    if not loss.requires_grad:
        raise UserCodeError(f"{name} returned a loss without gradient {where}; compute it "
                            "from student_logits with torch operations (no .item(), numpy)")  # fmt: skip


def check_user_loss(condition: Condition, num_classes: int = 5) -> None:
    """Call the user's loss once on random logits (as before any run): a wrong signature, a
    non-scalar, a NaN or a loss without gradient fails here in one line, not in every run."""
    fn = user_loss(condition)
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(8, num_classes, generator=gen).requires_grad_()
    z_t = torch.randn(8, num_classes, generator=gen)
    y = torch.randint(num_classes, (8,), generator=gen)
    try:
        loss = fn(z_s, z_t, y, 0.5, 2.0)
    except Exception as err:
        raise UserCodeError(f"loss {condition.loss} ({condition.name}) fails on random logits "
                            f"(8, {num_classes}): {type(err).__name__}: {err}") from None  # fmt: skip
    check_loss_value(loss, condition, "on random logits")
